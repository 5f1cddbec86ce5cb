"""Generation latency: moekit's KV-cache decoding against transformers' `generate` on the same models.

`run_decode_benchmark` uses the same models as the model benchmark (`moekit.bench.model.prepare`): each
preset's `MoETransformer`, its exported transformers twin under every experts implementation, and for
DeepSeek-V3-style presets `DeepseekV3ForCausalLM` (MLA, random weights). For each batch size (default 1 and 8)
a seeded prompt of P tokens (default 64) is extended by N new tokens (default 64), greedily:

* moekit: ``moekit.model.generate.generate(model, prompt, N, temperature=0)`` (prefill, then one cached step
  per token);
* transformers: ``model.generate(prompt, attention_mask=ones, do_sample=False, max_new_tokens=N,
  min_new_tokens=N)`` with its default cache (`DynamicCache`).

Before timing, the exported twins' greedy tokens are checked equal to moekit's. A difference is accepted only
where it is a tie: at the first differing token, moekit's logits for the two chosen tokens are within 1e-4
(the run reports it); any other difference raises. DeepseekV3 (random weights) is only checked to produce
P + N tokens per row.

Each row is timed twice per round, interleaved round-robin with all other rows: generating 1 token (the
prefill plus one pick: "prefill ms") and generating N tokens. The decode phase costs
``(time(N) - time(1)) / (N - 1)`` per new token, which cancels the fixed per-call overhead of either API.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model.generate import generate
from ..train.config import RunConfig
from .harness import (
    SEED,
    WARMUP,
    Env,
    Timer,
    bench_context,
    bench_env,
    check_json_path,
    first_line,
    fmt,
    footer,
    header,
    is_slow,
    load_transformers,
    measure_peak_memory,
    print_checks_and_notes,
    print_rows,
    progress,
    quiet_transformers,
    resolve_repeats,
    run_interleaved,
    timed,
    timed_result,
    write_result,
)
from .model import DEFAULT_PRESETS, ModelCandidate, Prepared, prepare, resolve_runs

DEFAULT_PROMPT = 64
DEFAULT_NEW_TOKENS = 64
DEFAULT_BATCHES = (1, 8)
DECODE_REPEATS = 5  # the decode benchmark's default timed rounds
QUICK_PROMPT, QUICK_NEW_TOKENS, QUICK_BATCHES = 16, 8, (1,)
TIE_TOL = 1e-4  # logit gap under which two greedy choices count as a tie


def generator_call(candidate: ModelCandidate, prompt: Tensor, new_tokens: int) -> Callable[[], Tensor]:
    """A closure generating `new_tokens` greedy tokens after `prompt` [B, P]; returns [B, P + new_tokens]."""
    model = candidate.model
    if candidate.library == "moekit":
        return lambda: generate(model, prompt, new_tokens, temperature=0)
    mask = torch.ones_like(prompt)

    def run() -> Tensor:
        return model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens)

    return run


def compare_greedy(expected: Tensor, actual: Tensor, reference: ModelCandidate | None, prompt_len: int, label: str,
                   logits_of: Callable[[Tensor], Tensor] | None = None, reference_name: str = "moekit") -> list[str]:
    """Check `actual` greedy tokens against moekit's `expected`; return notes on tie flips, raise otherwise.

    At each row's first differing token, moekit's logits (on the common prefix) for the two chosen tokens must be
    within `TIE_TOL`: a tie that rounding in the last bits may break either way. After it the rows diverge.
    `logits_of(ids [1, P]) -> [1, P, V]` replaces `reference.model` for another reference (`reference_name`).
    """
    if logits_of is None:
        def logits_of(ids: Tensor) -> Tensor:
            return reference.model(ids).logits
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{label}: generated shape {tuple(actual.shape)}, {reference_name} "
                             f"{tuple(expected.shape)}")
    notes = []
    for row in range(expected.shape[0]):
        differ = (expected[row] != actual[row]).nonzero()
        if differ.numel() == 0:
            continue
        position = int(differ[0, 0])
        if position < prompt_len:
            raise AssertionError(f"{label}: row {row}'s prompt was changed at position {position}")
        mine, theirs = int(expected[row, position]), int(actual[row, position])
        with torch.no_grad():
            logits = logits_of(expected[row: row + 1, :position])[0, -1].float()
        gap = abs(float(logits[mine] - logits[theirs]))
        step = position - prompt_len
        if gap > TIE_TOL:
            raise AssertionError(
                f"{label}: greedy token {step} of row {row} is {theirs}, {reference_name}'s is {mine}, and "
                f"{reference_name}'s logits for them differ by {gap:.2e} > {TIE_TOL:g}: not a tie, so the two models "
                "do not compute the same function on the same weights")
        notes.append(f"{label}: row {row} differs from {reference_name} from new token {step} on, a tie (logit gap "
                     f"{gap:.1e} <= {TIE_TOL:g}); the tokens before it agree")
    return notes


@dataclass
class DecodeRow:
    label: str
    library: str
    architecture: str
    impl: str | None
    batch: int
    one_ms: float | None = None  # generate 1 token: prefill + one pick
    all_ms: float | None = None  # generate N tokens
    one_peak_mib: float | None = None  # CUDA only
    all_peak_mib: float | None = None
    timed_once: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The row as the JSON result holds it."""
        return {"label": self.label, "library": self.library, "architecture": self.architecture,
                "experts_implementation": self.impl, "batch": self.batch, "generate_1_ms": self.one_ms,
                "generate_n_ms": self.all_ms, "generate_1_peak_mib": self.one_peak_mib,
                "generate_n_peak_mib": self.all_peak_mib, "timed_once": self.timed_once, **self.extra}


def _check(prepared: Prepared, prompts: dict[int, Tensor], new_tokens: int, env: Env,
           checks: list[dict]) -> tuple[list[ModelCandidate], dict[tuple[str, int], float]]:
    """Greedy-token checks (fp32) for every candidate and batch; returns the candidates that ran and the time of
    each checked generate call (used to spot rows too slow to repeat)."""
    reference = prepared.candidates[0]
    kept: list[ModelCandidate] = []
    seconds: dict[tuple[str, int], float] = {}
    expected: dict[int, Tensor] = {}
    for candidate in prepared.candidates:
        candidate.model.eval()
        try:
            outputs = {}
            for batch, prompt in prompts.items():
                call = generator_call(candidate, prompt, new_tokens)
                seconds[(candidate.label, batch)], outputs[batch] = timed_result(call, env.sync)
        except AssertionError:
            raise
        except Exception as error:
            if candidate is reference:
                raise  # moekit is every ratio's baseline
            prepared.notes.append(f"{candidate.label}: skipped, generate raised {type(error).__name__}: "
                                  f"{first_line(error)}")
            continue
        prompt_len = next(iter(prompts.values())).shape[1]
        for batch, tokens in outputs.items():
            if candidate is reference:
                expected[batch] = tokens
                continue
            what = f"{candidate.label}, batch {batch}"
            if candidate.same_weights:
                ties = compare_greedy(expected[batch], tokens, reference, prompt_len, what)
                prepared.notes.extend(ties)
                agree = int((tokens[:, prompt_len:] == expected[batch][:, prompt_len:]).sum())
                checks.append({"what": f"{what}: greedy tokens equal to moekit's ({agree} of "
                                       f"{tokens[:, prompt_len:].numel()} new tokens"
                                       + (", the rest after a tie)" if ties else ")"), "ties": len(ties),
                               "passed": True})
            else:
                if tuple(tokens.shape) != (batch, prompt_len + new_tokens):
                    raise AssertionError(f"{what}: generated shape {tuple(tokens.shape)}, expected "
                                         f"{(batch, prompt_len + new_tokens)}")
                checks.append({"what": f"{what}: generated {new_tokens} tokens per row (random weights, no "
                                       "equality to check)", "ties": 0, "passed": True})
        kept.append(candidate)
    return kept, seconds


def _bench_decode_preset(prepared: Prepared, env: Env, repeats: int, prompt_len: int, new_tokens: int,
                  batches: list[int]) -> dict:
    run = prepared.run
    generator = torch.Generator().manual_seed(SEED + 2)
    prompts = {b: torch.randint(0, run.model.vocab_size, (b, prompt_len), generator=generator).to(env.device)
               for b in batches}
    for candidate in prepared.candidates:
        candidate.model.to(env.device)
    checks: list[dict] = []
    candidates, check_seconds = _check(prepared, prompts, new_tokens, env, checks)

    rows: list[DecodeRow] = []
    timers: list[Timer] = []
    for batch in batches:
        reference_seconds = check_seconds[(candidates[0].label, batch)]
        for candidate in candidates:
            candidate.model.to(env.device, env.dtype).eval()
            row = DecodeRow(candidate.label, candidate.library, candidate.architecture, candidate.impl, batch)
            one = generator_call(candidate, prompts[batch], 1)
            full = generator_call(candidate, prompts[batch], new_tokens)
            if candidate.library != "moekit" and is_slow(check_seconds[(candidate.label, batch)],
                                                         reference_seconds):
                row.timed_once = True
                row.one_ms, row.all_ms = timed(one, env.sync) * 1e3, timed(full, env.sync) * 1e3
            else:
                timers += [Timer(row, "one_ms", one), Timer(row, "all_ms", full)]
            rows.append(row)
    progress(f"  [{run.name}] timing {len(timers)} measurements in {WARMUP + repeats} interleaved rounds ...")
    run_interleaved(timers, repeats, env.sync)
    measure_peak_memory(timers, env)
    _add_decode_ratios(rows, new_tokens)
    return {"preset": run.name, "export_architecture": prepared.export_arch, "prompt_tokens": prompt_len,
            "new_tokens": new_tokens, "batches": batches, "checks": checks, "notes": prepared.notes,
            "rows": [r.as_dict() for r in rows], "best": _fastest_decode_per_batch(rows)}


def _add_decode_ratios(rows: list[DecodeRow], new_tokens: int) -> None:
    for row in rows:
        per_token = None
        if row.one_ms is not None and row.all_ms is not None and new_tokens > 1:
            per_token = (row.all_ms - row.one_ms) / (new_tokens - 1)
        row.extra["prefill_ms"] = row.one_ms
        row.extra["decode_ms_per_token"] = per_token
        row.extra["decode_tokens_per_s"] = row.batch / (per_token / 1e3) if per_token and per_token > 0 else None
    for row in rows:
        moekit = next(r for r in rows if r.library == "moekit" and r.batch == row.batch)
        for key, name in (("prefill_ms", "prefill_moekit_speedup"), ("decode_ms_per_token", "decode_moekit_speedup")):
            mine, theirs = moekit.extra[key], row.extra[key]
            row.extra[name] = theirs / mine if mine and theirs and mine > 0 else None


def _fastest_decode_per_batch(rows: list[DecodeRow]) -> dict[str, dict]:
    """Per transformers architecture and batch: the experts implementation with the fastest decode per token."""
    best: dict[str, dict] = {}
    for row in rows:
        per_token = row.extra["decode_ms_per_token"]
        if row.library == "moekit" or per_token is None:
            continue
        key = f"{row.architecture} @ batch {row.batch}"
        if key not in best or per_token < best[key]["decode_ms_per_token"]:
            best[key] = {"experts_implementation": row.impl, "decode_ms_per_token": per_token,
                         "moekit_speedup": row.extra["decode_moekit_speedup"]}
    return best


def _print_result(result: dict, env: Env, print_fn: Callable[..., Any]) -> None:
    print_fn(f"\nPreset {result['preset']}: prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new "
             f"tokens, greedy (exported as {result['export_architecture']})")
    headers = ["model", "batch", "prefill ms", "moekit speed-up (prefill)", "decode ms/token", "decode tok/s",
               "moekit speed-up (decode)", f"total ms ({result['new_tokens']} tokens)"]
    if env.cuda:
        headers.append("peak MiB (all tokens)")
    table = []
    for row in result["rows"]:
        mark = " (timed once)" if row["timed_once"] else ""
        cells = [row["label"] + mark, str(row["batch"]), fmt(row["prefill_ms"], "{:.1f}"),
                 fmt(row["prefill_moekit_speedup"], "{:.2f}x"), fmt(row["decode_ms_per_token"], "{:.2f}"),
                 fmt(row["decode_tokens_per_s"], "{:,.0f}"), fmt(row["decode_moekit_speedup"], "{:.2f}x"),
                 fmt(row["generate_n_ms"], "{:.1f}")]
        if env.cuda:
            cells.append(fmt(row["generate_n_peak_mib"], "{:.1f}"))
        table.append(cells)
    print_rows(headers, table, print_fn)
    for key, best in result["best"].items():
        speedup = best["moekit_speedup"]
        print_fn(f"  best {key}: [{best['experts_implementation']}], moekit decodes "
                 f"{fmt(speedup, '{:.2f}x')} its speed")
    print_checks_and_notes(result, print_fn)


def run_decode_benchmark(presets: Iterable[str | RunConfig] | None = DEFAULT_PRESETS, device: str = "cpu",
                         threads: int = 2, repeats: int = DECODE_REPEATS, prompt_tokens: int | None = None,
                         new_tokens: int | None = None, batch_sizes: Iterable[int] | None = None,
                         json_path: str | Path | None = None, print_fn: Callable[..., Any] = print,
                         quick: bool = False) -> dict:
    """Time greedy generation (prefill, then per-token decode with a KV cache) of moekit vs transformers.

    Args:
        presets: preset names (default tiny-mixtral and tiny-deepseek) or `RunConfig`s (e.g. tiny ones).
        device: "cpu" (fp32) or "cuda" (checks in fp32, timing in bf16).
        threads: torch CPU threads during the run (restored afterwards).
        repeats: interleaved timed rounds after `WARMUP` untimed ones; medians are reported.
        prompt_tokens, new_tokens: P and N (default 64 and 64; with `quick`, 16 and 8). N must be at least 2.
        batch_sizes: prompts per call (default 1 and 8; with `quick`, 1).
        json_path: also write the returned dict there (atomically).
        print_fn: where the tables go.
        quick: at most 2 rounds and small defaults, for a smoke run.

    Returns:
        ``{"benchmark": "decode", "machine", "device", "dtype", "repeats", "warmup", "results"}``: per preset its
        checks, notes, rows (prefill ms, decode ms per new token, tokens/s, moekit's speed-up = row time /
        moekit's, > 1 means moekit is faster) and the best experts implementation per architecture and batch.

    Raises:
        ValueError: an unknown or dense preset, one with no transformers twin, a bad device or size.
        ImportError: transformers is not installed.
        AssertionError: a twin's greedy tokens differ from moekit's other than by a tie.
    """
    env = bench_env(device)
    runs = resolve_runs(presets)
    tf = load_transformers()
    check_json_path(json_path)
    prompt_len = prompt_tokens or (QUICK_PROMPT if quick else DEFAULT_PROMPT)
    count = new_tokens or (QUICK_NEW_TOKENS if quick else DEFAULT_NEW_TOKENS)
    batches = list(batch_sizes) if batch_sizes is not None else list(QUICK_BATCHES if quick else DEFAULT_BATCHES)
    repeats = resolve_repeats(repeats, quick)
    if prompt_len < 1:
        raise ValueError(f"prompt_tokens must be a positive integer, got {prompt_len}")
    if count < 2:
        raise ValueError(f"new_tokens must be at least 2 (the per-token cost is (time(N) - time(1)) / (N - 1)), "
                         f"got {count}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {batches}")
    for run in runs:
        if prompt_len + count > run.model.max_position_embeddings:
            raise ValueError(f"prompt_tokens + new_tokens = {prompt_len + count} exceeds preset {run.name!r}'s "
                             f"max_position_embeddings={run.model.max_position_embeddings}; shorten them")
    with bench_context(threads, env), quiet_transformers(tf), tempfile.TemporaryDirectory() as tmp:
        prepared = [prepare(run, tf, Path(tmp)) for run in runs]
        info = header("Decode benchmark: greedy generation with a KV cache", env, tf, threads, repeats, print_fn)
        print_fn("  prefill ms = generate 1 new token (prefill + one pick); decode ms/token = (time(N) - time(1)) "
                 "/ (N - 1);")
        print_fn("  moekit: moekit.model.generate.generate(temperature=0); transformers: model.generate(do_sample="
                 "False, max_new_tokens=N, min_new_tokens=N), default cache. moekit speed-up = row time / moekit's.")
        results = []
        for item in prepared:
            result = _bench_decode_preset(item, env, repeats, prompt_len, count, batches)
            _print_result(result, env, print_fn)
            results.append(result)
        footer(info, env, print_fn)
    output = {"benchmark": "decode", "machine": info, "device": env.device.type,
              "dtype": str(env.dtype).removeprefix("torch."), "repeats": repeats, "warmup": WARMUP,
              "results": results}
    write_result(json_path, output, print_fn)
    return output
