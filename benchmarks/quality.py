"""The seeds' claims at small scale, measured on a mixed corpus (issue 17), and moekit's training speed against
transformers' MixtralForCausalLM of the same shape.

Corpus: `benchmarks/quality_corpus.py` builds three domains offline (Shakespeare's plays, Python standard-library
source, generated arithmetic), interleaved in chunks so the validation split (the tail) holds all three, plus a
held-out file per domain for the analysis.

Measured (all on this CPU, same data, batch, block and active FFN width 512):
1. domain specialisation: `tiny-mixtral` and `tiny-deepseek` (and the aux-loss variant) analysed with
   `moekit.analysis.analyze` on the held-out domain files: mutual information I(domain; expert) per layer against
   the permutation baseline (mean, p95);
2. aux-loss-free against aux-loss balancing: `tiny-deepseek` with its aux-free bias, and with
   `aux_free_bias_update_rate=0, router_aux_loss_coef=0.01`, over `--seeds` seeds at equal tokens: MaxVio_global
   and MaxVio_batch (analyze on the validation split, batches of the training batch size) and val loss;
3. MoE against the `dense` preset at equal tokens (same steps) and at equal wall-clock on this CPU (dense gets
   the steps that fit in the MoE run's measured training time, from dense's own measured step time);
4. training-step throughput, moekit against transformers' MixtralForCausalLM (tiny-mixtral shape).

Usage:
    python benchmarks/quality.py                       # the recorded budget (300 steps a run, 2 threads)
    python benchmarks/quality.py --steps 20 --seeds 1  # a quick check of the machinery
Writes benchmarks/results/quality.md and quality.json (or --results DIR), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# On a shared machine, OpenMP threads that spin while they wait for each other make every step many times slower
# as soon as another process wants a core (measured here: 4.8 s instead of 0.39 s per tiny-deepseek step on 2
# threads); waiting passively avoids that. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # quality_corpus, and the moekit of this checkout

from quality_corpus import DOMAINS, CorpusInfo, build_corpus  # noqa: E402

from moekit._files import atomic_write, write_json  # noqa: E402
from moekit.cli import load_run_dict  # noqa: E402
from moekit.train.config import RunConfig, apply_overrides  # noqa: E402
from moekit.train.loop import Trainer  # noqa: E402
from moekit.train.report import compare_runs, read_metrics  # noqa: E402

AUX_LOSS = ["model.moe.aux_free_bias_update_rate=0", "model.moe.router_aux_loss_coef=0.01"]
"""tiny-deepseek with the Switch aux loss in place of the aux-free bias (its tiny sequence-wise loss stays)."""


# ------------------------------------------------------------------------------------------------------ training


def train_run(out: Path, name: str, preset: str, steps: int, data: Path, seed: int = 0,
              overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one run of `steps` steps on `data`; returns its summary (time, tokens, final val loss, ...)."""
    values = load_run_dict(preset, None)
    values["name"] = name
    extra = [*overrides, f"train.data={data}", f"train.seed={seed}", f"train.max_steps={steps}",
             f"train.warmup_steps={min(50, max(1, steps // 10))}", f"train.eval_interval={max(1, steps // 2)}",
             "train.eval_batches=64",  # the whole validation split, so every run is scored on the same tokens
             f"train.checkpoint_interval={steps}",
             # the last step is logged (its tokens and elapsed time are the run's): an interval dividing `steps`
             f"train.log_interval={max(d for d in range(1, 11) if steps % d == 0)}"]
    run = RunConfig.from_dict(apply_overrides(values, extra))
    run_dir = out / name
    started = time.perf_counter()
    Trainer(run, run_dir, overwrite=True, progress=False).train()
    wall = time.perf_counter() - started
    train, evals = read_metrics(run_dir)
    if train[-1]["step"] != steps:
        raise RuntimeError(f"{run_dir}: the last logged step is {train[-1]['step']}, not {steps}")
    summary = {"name": name, "preset": preset, "seed": seed, "overrides": list(overrides), "steps": steps,
               "tokens": train[-1]["tokens"], "train_time_s": train[-1]["elapsed_s"], "wall_s": wall,
               "step_time_s": train[-1]["elapsed_s"] / steps, "val_loss": evals[-1]["val_loss"],
               "val_max_violation_trainer": evals[-1].get("val_max_violation"), "run_dir": str(run_dir)}
    print(f"  {name}: {steps} steps, {summary['train_time_s']:.0f} s training, val loss {summary['val_loss']:.4f}",
          flush=True)
    return summary


# ------------------------------------------------------------------------------------------------------ analysis


def analyse(run: dict[str, Any], out: Path, tokens: int, batch_size: int, domains: Path | None,
            figures: bool = True) -> dict[str, Any]:
    """`moekit.analysis.analyze` on the run's validation split (domains None) or on the held-out domain files
    (with its figures and routing.html when `figures`)."""
    from moekit.analysis import analyze

    where = out / "analysis" / (run["name"] + ("-domains" if domains else "-val"))
    return analyze(run["run_dir"], domains=str(domains) if domains else None, tokens=tokens, batch_size=batch_size,
                   out=where, figures=figures and domains is not None,  # the domain heatmaps are worth drawing
                   save_trace=domains is not None)  # for the token-controlled information


def domain_rows(analysis: dict[str, Any], min_load: float = 0.5) -> list[dict[str, Any]]:
    """Per MoE layer: I(domain; expert) in nats, its permutation baseline, I / H(domain) (0 = the expert says nothing
    about the domain, 1 = it determines it), and per domain its most domain-pure expert: the expert, among those
    with at least `min_load` of the ideal load, whose assignments are most from that domain (chance: the domain's
    share of all assignments)."""
    rows = []
    for layer in analysis["layers"]:
        dom = layer["domains"]
        table = dom["load"]  # [D][E] assignments
        per_domain = [sum(r) for r in table]
        per_expert = [sum(col) for col in zip(*table, strict=True)]
        total = sum(per_domain)
        h_domain = -sum(n / total * math.log(n / total) for n in per_domain if n)
        ideal = total / len(per_expert)
        candidates = [e for e, n in enumerate(per_expert) if n >= min_load * ideal]
        purest = {}
        for d, name in enumerate(dom["names"]):
            e = max(candidates, key=lambda e: table[d][e] / per_expert[e])
            purest[name] = {"expert": e, "purity": table[d][e] / per_expert[e], "chance": per_domain[d] / total}
        rows.append({"layer": layer["layer"], "mutual_information": dom["mutual_information"],
                     "baseline_mean": dom["baseline_mean"], "baseline_p95": dom["baseline_p95"],
                     "normalised": dom["mutual_information"] / h_domain if h_domain else 0.0, "purest": purest})
    return rows


def conditional_domain_information(trace: Path, permutations: int = 20, seed: int = 0) -> dict[int, dict]:
    """Per MoE layer, I(domain; expert | token id) in nats from a routing trace, against domain labels shuffled
    among the occurrences of each token id (mean, p95 over `permutations`).

    Domains differ in which tokens they use (arithmetic is digits), so an expert chosen by token identity alone
    already carries domain information; this measures what the routing says about the domain beyond the token.
    By the chain rule, I(D; X | T) = I(D; (T, X)) - I(D; T), each computed by `domain_mutual_information`.
    """
    from moekit.analysis.metrics import domain_mutual_information
    from moekit.analysis.trace import read_trace

    tensors, meta = read_trace(trace)
    domains, tokens = tensors["domains"].long(), tensors["token_ids"].long()
    num_experts, vocab, num_domains = meta["num_experts"], meta["vocab_size"], len(meta["domains"])
    generator = torch.Generator().manual_seed(seed)
    by_token = torch.argsort(tokens, stable=True)

    def shuffled_within_tokens() -> torch.Tensor:
        jitter = torch.rand(tokens.numel(), generator=generator, dtype=torch.float64)
        order = torch.argsort(tokens.double() + jitter)  # each token id's occurrences, in a random order
        out = torch.empty_like(domains)
        out[by_token] = domains[order]
        return out

    def information(labels: torch.Tensor, index: torch.Tensor) -> float:
        joint = domain_mutual_information(labels, tokens[:, None] * num_experts + index, vocab * num_experts,
                                          num_domains, permutations=0).mutual_information
        token_only = domain_mutual_information(labels, tokens[:, None], vocab, num_domains,
                                               permutations=0).mutual_information
        return joint - token_only

    nulls = [shuffled_within_tokens() for _ in range(permutations)]
    result = {}
    for j, layer in enumerate(meta["moe_layers"]):
        index = tensors["expert_index"][:, j].long()
        null = torch.tensor([information(labels, index) for labels in nulls], dtype=torch.float64)
        result[layer] = {"conditional_mutual_information": information(domains, index),
                         "conditional_baseline_mean": float(null.mean()),
                         "conditional_baseline_p95": float(torch.quantile(null, 0.95))}
    return result


def spread(values: list[float]) -> dict[str, float]:
    """mean, min, max and sample std (0 for one value)."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ------------------------------------------------------------------------------------------------------ speed


def interleaved_step_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each training-step callable, timed in interleaved rounds (the first two warm up), so a
    change in the machine's load during the measurement hits them all alike."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                transformers_model: bool = False) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> None:
        if transformers_model:
            loss = model(input_ids=x, labels=y).loss  # includes its router aux loss, as moekit's does
        else:
            out = model(x, targets=y)
            loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _batch(vocab_size: int, batch_size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (batch_size, block_size + 1))
    return ids[:, :-1], ids[:, 1:]


def preset_step_times(presets: list[str], repeats: int = 10) -> dict[str, float]:
    """Median training-step seconds of each preset's model (its batch and block size) on this CPU, interleaved."""
    from moekit.model import MoETransformer

    steps = {}
    for preset in presets:
        run = RunConfig.from_dict(load_run_dict(preset, None))
        torch.manual_seed(0)
        x, y = _batch(run.model.vocab_size, run.train.batch_size, run.train.block_size)
        steps[preset] = _train_step(MoETransformer(run.model), x, y, run.train.lr)
    return interleaved_step_times(steps, repeats)


def speed_vs_transformers(repeats: int = 6) -> dict[str, float]:
    """Training-step tokens/s of tiny-mixtral in moekit and in transformers' MixtralForCausalLM (same shape)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from moekit.model import MoETransformer

    run = RunConfig.from_dict(load_run_dict("tiny-mixtral", None))
    m, t = run.model, run.train
    hf_config = MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                              intermediate_size=m.moe.moe_intermediate_size,
                              num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                              num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_position_embeddings,
                              num_local_experts=m.moe.num_local_experts, num_experts_per_tok=m.moe.num_experts_per_tok,
                              tie_word_embeddings=m.tie_word_embeddings, rms_norm_eps=m.rms_norm_eps,
                              router_aux_loss_coef=m.moe.router_aux_loss_coef, output_router_logits=True)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    x, y = _batch(m.vocab_size, t.batch_size, t.block_size)
    steps = {"moekit": _train_step(MoETransformer(m), x, y, 1e-3),
             "transformers": _train_step(MixtralForCausalLM(hf_config), x, y, 1e-3, transformers_model=True)}
    medians = interleaved_step_times(steps, repeats)
    tokens = t.batch_size * t.block_size
    result = {f"{k}_tokens_per_s": tokens / v for k, v in medians.items()}
    result["ratio"] = result["moekit_tokens_per_s"] / result["transformers_tokens_per_s"]
    return result


# ------------------------------------------------------------------------------------------------------ report


def _range(s: dict[str, float], spec: str) -> str:
    return f"{format(s['mean'], spec)} ({format(s['min'], spec)}..{format(s['max'], spec)})"


def render(results: dict[str, Any]) -> str:
    """quality.md: the tables, with the date, machine and command."""
    r = results
    lines = [f"Measured {r['date']} on {r['machine']}; command: `{r['command']}` "
             f"({r['total_time_s'] / 60:.1f} min; load average {r['load_average'][0]:.2f} at start, "
             f"{r['load_average'][1]:.2f} at end: the 2 cores were shared).", "",
             f"Corpus (`benchmarks/quality_corpus.py`, {r['corpus']['python_version']}): "
             + ", ".join(f"{d} {r['corpus']['train_bytes'][d]:,} B" for d in DOMAINS)
             + " of training text interleaved in chunks; held-out "
             + ", ".join(f"{d} {r['corpus']['heldout_bytes'][d]:,} B" for d in DOMAINS)
             + f". Every run: byte tokenizer, batch 16 x 128 tokens, {r['steps']} steps unless stated.", ""]

    lines += ["**Domain specialisation** (held-out text of each domain, "
              f"{r['analysis_tokens']:,} tokens asked for): mutual information I(domain; expert) in nats per MoE "
              "layer, against the same with domain labels permuted (mean, 95th percentile); I / H(domain) is the "
              "share of the domain's uncertainty the expert choice removes. Purest expert: for each domain, the "
              "expert (of those with at least half the ideal load) whose tokens are most from that domain, and that "
              "share (chance is about 33%).", "",
              "I(D; X | T) is the information the expert carries about the domain beyond the token id itself "
              "(domains use different bytes: arithmetic is digits), against domain labels shuffled among each "
              "token id's occurrences (p95). 'at init': the same model after one step at lr 1e-9.", "",
              "| model | layer | I(domain; expert) | permuted mean | permuted p95 | I / H(domain) | I(D; X \\| T) | "
              "its null p95 | purest expert per domain (share of its tokens) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in r["domain_specialisation"].items():
        for row in rows:
            top = ", ".join(f"{d} {row['purest'][d]['expert']} ({row['purest'][d]['purity']:.0%})" for d in DOMAINS
                            if d in row["purest"])
            lines.append(f"| {label} | {row['layer']} | {row['mutual_information']:.4f} | "
                         f"{row['baseline_mean']:.5f} | {row['baseline_p95']:.5f} | {row['normalised']:.3f} | "
                         f"{row['conditional_mutual_information']:.4f} | "
                         f"{row['conditional_baseline_p95']:.4f} | {top} |")
    lines.append("")

    b = r["balancing"]
    lines += [f"**Aux-loss-free against aux-loss balancing** (tiny-deepseek, {len(b['seeds'])} seeds "
              f"{b['seeds']}, {r['steps']} steps each; MaxVio from analyze on the validation split in batches of "
              f"{r['analysis_batch_size']} x 128 tokens, mean over MoE layers): mean (min..max), and std.", "",
              "| balancing | val loss | MaxVio_global | MaxVio_batch | std (loss / global / batch) |",
              "|---|---|---|---|---|"]
    for label, s in b["variants"].items():
        lines.append(f"| {label} | {_range(s['val_loss'], '.4f')} | {_range(s['max_violation_global'], '.3f')} | "
                     f"{_range(s['max_violation_batch'], '.3f')} | {s['val_loss']['std']:.4f} / "
                     f"{s['max_violation_global']['std']:.3f} / {s['max_violation_batch']['std']:.3f} |")
    lines += ["", "Per seed (val loss / MaxVio_global / MaxVio_batch / dead experts over all layers):", "",
              "| seed | " + " | ".join(b["variants"]) + " |", "|---|" + "---|" * len(b["variants"])]
    for i, seed in enumerate(b["seeds"]):
        cells = [f"{p['val_loss']:.4f} / {p['max_violation_global']:.3f} / {p['max_violation_batch']:.3f} / "
                 f"{p['dead_experts']}" for p in (b["per_seed"][label][i] for label in b["variants"])]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("")

    st = r["step_times_s"]
    lines += ["**MoE against dense** (seed 0 unless stated; val loss on the whole validation split). Equal "
              "wall-clock: dense gets the steps that take as long as the MoE run's, from the training-step times "
              "measured interleaved on this CPU (median of 10: "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in st.items())
              + "); the measured training times (evaluation included) are shown too, but they move with the load "
              "of the shared machine.", "",
              "| run | steps | tokens | training time | val loss |", "|---|---|---|---|---|"]
    for row in r["moe_vs_dense"]:
        lines.append(f"| {row['label']} | {row['steps']} | {row['tokens']:,} | {row['train_time_s']:.0f} s | "
                     f"{row['val_loss']:.4f} |")
    lines += ["", f"At equal tokens over seeds {r['seeds']} (val loss, mean (min..max), std): "
              + "; ".join(f"{k} {_range(v, '.4f')}, std {v['std']:.4f}" for k, v in
                          r["equal_tokens_over_seeds"].items()) + ".", ""]

    sp = r["speed"]
    lines += ["| training step, tiny-mixtral shape (batch 16 x 128 tokens, fp32) | tokens/s |", "|---|---|",
              f"| moekit | {sp['moekit_tokens_per_s']:,.0f} |",
              f"| transformers MixtralForCausalLM (sdpa, eager experts) | {sp['transformers_tokens_per_s']:,.0f} |",
              f"| ratio (moekit / transformers) | {sp['ratio']:.2f}x |", "", "All runs:", "", r["runs_table"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the corpus, train and analyse every run, measure the speed; returns the results dict."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    out = Path(args.out)
    print("building the corpus ...", flush=True)
    corpus: CorpusInfo = build_corpus(out / "corpus")
    data, steps, seeds = corpus.train, args.steps, list(range(args.seeds))
    runs: dict[str, dict[str, Any]] = {}

    def train(name: str, preset: str, n_steps: int, seed: int = 0, overrides: tuple[str, ...] = ()) -> dict:
        runs[name] = train_run(out, name, preset, n_steps, data, seed, overrides)
        return runs[name]

    print("measuring step times ...", flush=True)
    # Equal wall-clock: dense gets the steps whose time equals the MoE run's steps, from the step times of the
    # three models measured interleaved (robust to the load of a shared machine changing between runs).
    step_times = preset_step_times(["dense", "tiny-mixtral", "tiny-deepseek"])
    wall_steps = {p: max(1, round(steps * step_times[p] / step_times["dense"])) for p in ("tiny-mixtral",
                                                                                        "tiny-deepseek")}
    print("training ...", flush=True)
    deepseek = train("tiny-deepseek-s0", "tiny-deepseek", steps, 0)
    mixtral = train("tiny-mixtral", "tiny-mixtral", steps)
    dense = train("dense", "dense", steps)
    wall_ds = train("dense-wallclock-deepseek", "dense", wall_steps["tiny-deepseek"])
    wall_mx = train("dense-wallclock-mixtral", "dense", wall_steps["tiny-mixtral"])
    for seed in seeds[1:]:
        train(f"tiny-deepseek-s{seed}", "tiny-deepseek", steps, seed)
        train(f"dense-s{seed}", "dense", steps, seed)
    for seed in seeds:
        train(f"tiny-deepseek-aux-s{seed}", "tiny-deepseek", steps, seed, tuple(AUX_LOSS))

    print("analysing ...", flush=True)
    # references: the same models at initialisation (one step at lr 1e-9), whose routers know nothing yet
    untrained = {preset: train_run(out, f"{preset}-init", preset, 1, data, 0, ("train.lr=1e-9",))
                 for preset in ("tiny-mixtral", "tiny-deepseek")}
    domain_models = {"tiny-mixtral": mixtral, "tiny-mixtral at init": untrained["tiny-mixtral"],
                     "tiny-deepseek (aux-free)": deepseek, "tiny-deepseek (aux loss)": runs["tiny-deepseek-aux-s0"],
                     "tiny-deepseek at init": untrained["tiny-deepseek"]}
    domain_specialisation, domain_overall = {}, {}
    for label, run in domain_models.items():
        analysis = analyse(run, out, args.analysis_tokens, args.analysis_batch_size, corpus.domains_dir,
                           figures=args.figures)
        rows = domain_rows(analysis)
        conditional = conditional_domain_information(out / "analysis" / (run["name"] + "-domains") /
                                                     "trace.safetensors")
        for row in rows:
            row.update(conditional[row["layer"]])
        domain_specialisation[label] = rows
        domain_overall[label] = {k: analysis["overall"][k] for k in
                                 ("domain_mutual_information", "domain_baseline_mean", "domain_baseline_p95")}
        domain_overall[label]["analysis"] = str(out / "analysis" / (run["name"] + "-domains"))
    variants = {"aux-free bias": [f"tiny-deepseek-s{s}" for s in seeds],
                "aux loss 0.01": [f"tiny-deepseek-aux-s{s}" for s in seeds]}
    balancing: dict[str, Any] = {"seeds": seeds, "variants": {}, "per_seed": {}}
    for label, names in variants.items():
        per_seed = []
        for name in names:
            overall = analyse(runs[name], out, args.analysis_tokens, args.analysis_batch_size, None)["overall"]
            per_seed.append({"run": name, "val_loss": runs[name]["val_loss"],
                             "max_violation_global": overall["max_violation_global"],
                             "max_violation_batch": overall["max_violation_batch"],
                             "coefficient_of_variation": overall["coefficient_of_variation"],
                             "dead_experts": overall["dead_experts"]})
        balancing["per_seed"][label] = per_seed
        balancing["variants"][label] = {key: spread([p[key] for p in per_seed]) for key in
                                        ("val_loss", "max_violation_global", "max_violation_batch")}

    moe_vs_dense = [
        {"label": "tiny-deepseek (aux-free)", **_pick(deepseek)},
        {"label": "tiny-mixtral", **_pick(mixtral)},
        {"label": "dense, equal tokens", **_pick(dense)},
        {"label": "dense, equal wall-clock to tiny-deepseek", **_pick(wall_ds)},
        {"label": "dense, equal wall-clock to tiny-mixtral", **_pick(wall_mx)},
    ]
    equal_tokens_seeds = {
        "tiny-deepseek (aux-free)": spread([runs[f"tiny-deepseek-s{s}"]["val_loss"] for s in seeds]),
        "dense": spread([runs["dense" if s == 0 else f"dense-s{s}"]["val_loss"] for s in seeds])}
    table, _ = compare_runs([Path(r["run_dir"]) for r in runs.values()], out)
    print("speed against transformers ...", flush=True)
    speed = speed_vs_transformers()
    command = "python benchmarks/quality.py" + "".join(
        f" --{k.replace('_', '-')} {shlex.quote(str(v))}" if k != "figures" else " --no-figures"
        for k, v in vars(args).items() if v != DEFAULTS[k] and k not in ("out", "results"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu} ({platform.machine()}), {torch.get_num_threads()} threads "
                   f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), torch {torch.__version__}, "
                   f"Python {platform.python_version()}",
        "command": command, "steps": steps, "seeds": seeds, "analysis_tokens": args.analysis_tokens,
        "analysis_batch_size": args.analysis_batch_size,
        "total_time_s": time.perf_counter() - started, "load_average": [load_start, os.getloadavg()[0]],
        "corpus": {"python_version": corpus.python_version, "train_bytes": corpus.train_bytes,
                   "heldout_bytes": corpus.heldout_bytes, "stdlib_files": corpus.stdlib_files,
                   "sha256": corpus.sha256},
        "domain_specialisation": domain_specialisation, "domain_overall": domain_overall,
        "balancing": balancing, "moe_vs_dense": moe_vs_dense,
        "equal_tokens_over_seeds": equal_tokens_seeds, "step_times_s": step_times, "speed": speed,
        "runs": list(runs.values()), "runs_table": table,
    }


def _pick(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("name", "steps", "tokens", "train_time_s", "step_time_s", "val_loss")}


DEFAULTS = {"steps": 300, "seeds": 3, "threads": 2, "analysis_tokens": 98_304, "analysis_batch_size": 16,
            "out": "runs/quality", "results": "benchmarks/results", "figures": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="steps of every equal-token run")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds of the balancing comparison")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch.set_num_threads")
    parser.add_argument("--analysis-tokens", type=int, default=DEFAULTS["analysis_tokens"])
    parser.add_argument("--analysis-batch-size", type=int, default=DEFAULTS["analysis_batch_size"],
                        help="analyze's batch size (MaxVio_batch is over batches of this many windows)")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="skip analyze's figures and routing.html of the domain analyses")
    parser.add_argument("--out", default=DEFAULTS["out"], help="where the corpus, runs and analyses are written")
    parser.add_argument("--results", default=DEFAULTS["results"], help="where quality.md / quality.json go")
    args = parser.parse_args()
    if args.steps < 1 or args.seeds < 1 or args.threads < 1:
        parser.error("--steps, --seeds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = run_benchmark(args)
    text = render(results)
    print(text)
    where = Path(args.results)
    where.mkdir(parents=True, exist_ok=True)
    atomic_write(where / "quality.md", text, what="benchmark results")
    write_json(where / "quality.json", results, what="benchmark results")


if __name__ == "__main__":
    main()
