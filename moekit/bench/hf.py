"""transformers' own MoE models under every experts implementation, moekit's included (`moekit bench hf`).

`run_hf_benchmark` builds, per family (a transformers ``model_type``), one small causal LM from the family's own
config class (`BENCH_FAMILIES`: shapes scaled down from a released checkpoint's ratios) with a fixed seed, then one copy
per experts implementation with the same weights: transformers' ``eager`` (the family's own expert loop), every
implementation transformers registers in its `ExpertsInterface` (``grouped_mm``, ``batched_mm``, and those that
cannot run on the device, skipped with a note), and moekit's (``moekit``, registered by `moekit.hf`; the forced
backends ``moekit_loop``, ``moekit_grouped_mm``, ``moekit_bmm`` on request). Only the experts differ: attention,
router, embeddings and loss are transformers' code in every row.

Before anything is timed, every implementation must compute what ``eager`` computes (fp32, on the device):

* a training-mode forward and backward of a check batch: logits (atol = rtol = 1e-4), the loss (atol 1e-5) and
  the gradient of every parameter (within `GRAD_TOL` of the largest gradient of the tensor, see `grads_close`);
* greedy decoding of a prompt: the same tokens, or a difference at a tie of eager's logits
  (`moekit.bench.decode.TIE_TOL`).

A difference raises AssertionError and nothing is timed. Then, in one run and round-robin over every row
(`run_interleaved`), each implementation is timed for

* a **training step**: forward on ``[batch, seq]`` token ids with ``labels`` (transformers' shifted cross-entropy,
  plus its load-balancing loss where the family has one and ``router_aux_loss_coef > 0``), backward, AdamW step
  and ``zero_grad``; the first timed step's loss must equal eager's first (the weights are still the same);
* **greedy decoding**: ``model.generate(prompt, do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with the
  default cache, timed for 1 and for N new tokens; prefill = the 1-token call, decode per token = (time(N) -
  time(1)) / (N - 1), which cancels the per-call overhead of `generate`.

Ratios: a row's speed-up over eager is eager's time / the row's, and over transformers' fastest the fastest
transformers row's time / the row's (> 1: the row is faster), for the training step, prefill and decode.
On CPU everything is fp32; with ``device="cuda"`` the checks run in fp32 and the timing in bf16.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..train.optim import make_adamw
from .decode import compare_greedy, generator_call
from .harness import (
    ATOL,
    LOSS_ATOL,
    RTOL,
    SEED,
    SLOW_FACTOR,
    SLOW_SECONDS,
    WARMUP,
    Env,
    Timer,
    bench_context,
    bench_env,
    check_json_path,
    first_line,
    fmt,
    footer,
    gathered_weight_bytes,
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
    training_step_skip_note,
    uses_router_loss,
    write_result,
)
from .model import ModelCandidate

#: a gradient agrees when |g - g_eager| <= GRAD_TOL * max|g_eager| of that tensor + GRAD_RTOL * |g_eager|: fp32
#: sums in another order differ far less, a wrong expert, weight or missing term by the size of the values
GRAD_TOL, GRAD_RTOL = 1e-4, 1e-3
DEFAULT_FAMILIES = ("qwen3_moe", "olmoe", "gpt_oss")
HF_REPEATS = 5  # the hf benchmark's default timed rounds
#: (batch, sequence length) of the training step, (prompt tokens, new tokens) of decoding; and the check batch
TRAIN_SHAPE, QUICK_TRAIN_SHAPE = (8, 256), (2, 16)
DECODE_SHAPE, QUICK_DECODE_SHAPE = (32, 32), (8, 4)
CHECK_SHAPE, QUICK_CHECK_SHAPE = (2, 64), (2, 16)
VOCAB, QUICK_VOCAB = 4096, 256
LEARNING_RATE = 1e-4
#: moekit's implementation timed by default; the forced backends are timed when named in `implementations`
MOEKIT_DEFAULT = "moekit"

HF_LOSS_RULE = (
    "train = forward with labels (transformers' shifted cross-entropy, plus its load-balancing loss via "
    "output_router_logits=True where the family computes one and router_aux_loss_coef > 0) + backward + "
    "torch.optim.AdamW step (fused where torch has the kernel, lr 1e-4) + zero_grad(set_to_none=True); the "
    "same for every implementation, only the experts differ."
)


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class BenchFamily:
    """A transformers MoE family at the benchmark's size: its config class and the fields that set the shape."""

    config_class: str
    sizes: dict[str, Any]
    scaled_from: str  # the released checkpoint whose proportions the shape follows


_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}

BENCH_FAMILIES: dict[str, BenchFamily] = {
    "qwen3_moe": BenchFamily("Qwen3MoeConfig", {
        "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128, "num_hidden_layers": 4,
        **_ATTENTION, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": []}, "Qwen3-30B-A3B (128 experts top-8, expert width 3/8 hidden)"),
    "olmoe": BenchFamily("OlmoeConfig", {
        "hidden_size": 512, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "num_experts": 64, "num_experts_per_tok": 8},
        "OLMoE-1B-7B (64 experts top-8, expert width 1/2 hidden)"),
    "gpt_oss": BenchFamily("GptOssConfig", {
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4, **_ATTENTION,
        "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "max_position_embeddings": 131072},  # its YaRN rope: 32 x the original 4096 positions
        "gpt-oss-20b (32 experts top-4, biases, clamped SwiGLU, attention sinks)"),
    "mixtral": BenchFamily("MixtralConfig", {
        "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, **_ATTENTION, "num_local_experts": 8,
        "num_experts_per_tok": 2}, "Mixtral-8x7B (8 experts top-2, expert width 3.5 hidden)"),
    "qwen2_moe": BenchFamily("Qwen2MoeConfig", {
        "hidden_size": 256, "intermediate_size": 704, "moe_intermediate_size": 176,
        "shared_expert_intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
        "mlp_only_layers": []}, "Qwen1.5-MoE-A2.7B (60 experts top-4 + a shared expert)"),
    "deepseek_v3": BenchFamily("DeepseekV3Config", {
        "hidden_size": 256, "intermediate_size": 640, "moe_intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 64, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": None,
        "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64, "head_dim": 32},
        "DeepSeek-V3 (MLA, group-limited routing, 256 experts top-8 + a shared expert; 64 experts here)"),
    "granitemoe": BenchFamily("GraniteMoeConfig", {
        "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_local_experts": 32, "num_experts_per_tok": 8},
        "granite-3.0-1b-a400m (32 experts top-8, expert width 1/2 hidden)"),
    "phimoe": BenchFamily("PhimoeConfig", {
        "hidden_size": 256, "intermediate_size": 400, "num_hidden_layers": 4, **_ATTENTION, "num_local_experts": 16,
        "num_experts_per_tok": 2}, "Phi-3.5-MoE (16 experts top-2, router jitter)"),
}

#: the `quick` shape: every size field a family sets is replaced by the value here (tests and smoke runs)
QUICK_SIZES: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
    "num_local_experts": 8, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16, "sliding_window": 8,
}


def resolve_families(names: Iterable[str] | None) -> list[str]:
    """Family names (transformers model_types) in the order given; ValueError naming the supported ones."""
    entries = [name.strip() for name in (DEFAULT_FAMILIES if names is None else names) if name.strip()]
    if not entries:
        raise ValueError(f"no family named; choose from {', '.join(BENCH_FAMILIES)}")
    unknown = [name for name in entries if name not in BENCH_FAMILIES]
    if unknown:
        raise ValueError(f"unknown family {', '.join(map(repr, unknown))} for `moekit bench hf`; supported "
                         f"model_types: {', '.join(BENCH_FAMILIES)}")
    return list(dict.fromkeys(entries))


def family_config(tf: SimpleNamespace, model_type: str, quick: bool = False) -> Any:
    """The family's transformers config at the benchmark's (or the quick) shape: fp32, untied embeddings, no
    special token ids (every id is an ordinary token), a context long enough for the training step."""
    family = BENCH_FAMILIES[model_type]
    sizes = dict(family.sizes)
    if quick:
        sizes.update({key: QUICK_SIZES[key] for key in sizes if key in QUICK_SIZES})
        if "layer_types" in sizes:
            sizes["layer_types"] = sizes["layer_types"][: sizes["num_hidden_layers"]]
    config_class = getattr(tf.module, family.config_class)
    sizes = {"max_position_embeddings": 1024, **sizes}
    config = config_class(vocab_size=QUICK_VOCAB if quick else VOCAB, tie_word_embeddings=False, bos_token_id=None,
                          eos_token_id=None, pad_token_id=None, **sizes)
    if config.model_type != model_type:  # the table names the wrong class: a bug here, not the user's
        raise AssertionError(f"{family.config_class} is model_type {config.model_type!r}, not {model_type!r}")
    return config


# ---------------------------------------------------------------------------------------------- models
def interface_experts(model: nn.Module) -> list[nn.Module]:
    """The model's experts modules that transformers' experts interface dispatches (what the implementations run)."""
    from ..hf import is_interface_experts

    return [module for module in model.modules() if is_interface_experts(module)]


def describe(model: nn.Module, config: Any) -> dict[str, Any]:
    """The shape that matters for the experts, read off the built model."""
    experts = interface_experts(model)
    first = experts[0]
    in_proj = first.gate_up_proj if first.has_gate else first.up_proj
    width = in_proj.shape[2 if first.is_transposed else 1] // (2 if first.has_gate else 1)
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "moe_layers": len(experts), "num_experts": first.num_experts, "top_k": config.num_experts_per_tok,
            "expert_width": width, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters())}


def transformers_implementations(tf: SimpleNamespace) -> list[str]:
    """eager plus every experts implementation transformers itself registers (moekit's left out)."""
    from ..hf import IMPLEMENTATIONS

    return [impl for impl in tf.implementations if impl not in IMPLEMENTATIONS]


def training_loss_from_labels(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, logits) of a training forward: labels = the ids (transformers shifts them), plus the router loss."""
    extra = {"output_router_logits": True} if uses_router_loss(model) else {}
    out = model(input_ids=ids, labels=ids, use_cache=False, **extra)
    return out.loss, out.logits


def training_step_gathered_bytes(model: nn.Module, impl: str, tokens: int, env: Env) -> int:
    """Rough peak of the weights transformers' batched_mm gathers in a training step of `model`
    (`gathered_weight_bytes`: one expert's gate_up + down per (token, expert) pair, every MoE layer kept)."""
    experts = interface_experts(model)
    first = experts[0]
    in_proj = first.gate_up_proj if first.has_gate else first.up_proj
    return gathered_weight_bytes(impl, tokens, model.config.num_experts_per_tok,
                                 in_proj[0].numel() + first.down_proj[0].numel(), env.dtype,
                                 moe_layers=len(experts), backward=True)


@dataclass
class Implementation:
    """One copy of the family's model under one experts implementation."""

    name: str
    library: str  # "transformers" or "moekit"
    model: nn.Module

    @property
    def label(self) -> str:
        return f"[{self.name}]"


def build_models(tf: SimpleNamespace, config: Any, names: list[str], notes: list[str]) -> list[Implementation]:
    """The model built once from `config` with `SEED`, then one copy per implementation (same weights).

    An implementation that transformers refuses to set on this model is left out with a note; eager cannot be.
    """
    from ..hf import IMPLEMENTATIONS

    torch.manual_seed(SEED)
    base = tf.module.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.set_experts_implementation("eager")
    built = []
    for name in names:
        model = copy.deepcopy(base)
        try:
            model.set_experts_implementation(name)
        except Exception as error:
            if name == "eager":
                raise
            notes.append(f"[{name}]: skipped, set_experts_implementation raised {type(error).__name__}: "
                         f"{first_line(error)}")
            continue
        built.append(Implementation(name, "moekit" if name in IMPLEMENTATIONS else "transformers", model))
    return built


# ---------------------------------------------------------------------------------------------- checks
def grads_close(actual: Tensor, expected: Tensor) -> float:
    """The largest |actual - expected| over the tensor, in units of the tensor's largest |expected| (0 if all zero).

    Raises AssertionError when an element differs by more than GRAD_TOL * max|expected| + GRAD_RTOL * |expected|.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs()
    limit = GRAD_TOL * scale + GRAD_RTOL * expected.abs()
    if bool((diff > limit).any()) or not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"largest difference {diff.max().item():.3e} against a largest gradient of {scale:.3e}")
    return diff.max().item() / scale if scale else 0.0


def training_grads(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Training-mode (loss, logits, every parameter's gradient) on `ids`, with a fixed seed (router jitter)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED + 3)
    loss, logits = training_loss_from_labels(model, ids)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach(), grads


def check_training(reference: Implementation, candidate: Implementation, ids: Tensor,
                   expected: tuple[Tensor, Tensor, dict[str, Tensor]]) -> dict:
    """Logits, loss and every gradient of `candidate` equal `reference`'s (eager's); returns the check's record."""
    what = f"{candidate.label} vs [{reference.name}]"
    ref_loss, ref_logits, ref_grads = expected
    loss, logits, grads = training_grads(candidate.model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: logits differ although the weights are the same. {m}")
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=0,
                               msg=lambda m: f"{what}: the training loss differs. {m}")
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"{what}: gradients of {sorted(set(grads) ^ set(ref_grads))} are missing on one side")
    worst = 0.0
    for name, ref in ref_grads.items():
        try:
            worst = max(worst, grads_close(grads[name], ref))
        except AssertionError as error:
            raise AssertionError(f"{what}: the gradient of {name} differs: {error}") from None
    return {"what": f"{candidate.label}: training-mode logits, loss and all {len(ref_grads)} parameter gradients "
                    f"equal to [{reference.name}]'s", "max_abs_diff_logits": (logits - ref_logits).abs().max().item(),
            "max_grad_diff_relative": worst, "atol": ATOL, "grad_tol": GRAD_TOL, "passed": True}


def compare_tokens(expected: Tensor, actual: Tensor, reference: nn.Module, prompt_len: int, label: str) -> list[str]:
    """Greedy tokens of `label` against eager's `expected`: `moekit.bench.decode.compare_greedy`, eager's logits."""
    return compare_greedy(expected, actual, None, prompt_len, label,
                          logits_of=lambda ids: reference(input_ids=ids, use_cache=False).logits,
                          reference_name="eager")


def _as_candidate(impl: Implementation, architecture: str) -> ModelCandidate:
    return ModelCandidate(impl.label, "transformers", architecture, impl.name, impl.model, True)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class HFRow:
    impl: str
    library: str
    train_ms: float | None = None
    one_ms: float | None = None  # generate 1 token: prefill + one pick
    all_ms: float | None = None  # generate N tokens
    train_peak_mib: float | None = None  # CUDA only
    one_peak_mib: float | None = None
    all_peak_mib: float | None = None
    train_timed_once: bool = False
    decode_timed_once: bool = False
    first_loss: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The row as the JSON result holds it."""
        return {"experts_implementation": self.impl, "library": self.library, "train_ms": self.train_ms,
                "generate_1_ms": self.one_ms, "generate_n_ms": self.all_ms, "train_peak_mib": self.train_peak_mib,
                "generate_1_peak_mib": self.one_peak_mib, "generate_n_peak_mib": self.all_peak_mib,
                "train_timed_once": self.train_timed_once, "decode_timed_once": self.decode_timed_once,
                "first_step_loss": self.first_loss, **self.extra}


def recording_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor,
                            losses: list[float]) -> Callable[[], None]:
    """One training step of `model` on `ids`; the first call's loss goes to `losses`."""

    def run() -> None:
        loss, _ = training_loss_from_labels(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses:
            losses.append(loss.item())

    return run


def add_hf_ratios(rows: list[HFRow], tokens: int, new_tokens: int) -> None:
    """Per row: tokens/s, decode ms per token, and speed-ups over eager and over transformers' fastest row
    (the fastest row's time / the row's, per measure; > 1 means the row is faster)."""
    for row in rows:
        row.extra["train_tokens_per_s"] = tokens / (row.train_ms / 1e3) if row.train_ms else None
        row.extra["prefill_ms"] = row.one_ms
        per_token = None
        if row.one_ms is not None and row.all_ms is not None and new_tokens > 1:
            per_token = (row.all_ms - row.one_ms) / (new_tokens - 1)
        row.extra["decode_ms_per_token"] = per_token if per_token is None or per_token > 0 else None
    eager = next((row for row in rows if row.impl == "eager"), None)
    for measure, key in (("train", "train_ms"), ("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
        def value(row: HFRow, key: str = key) -> float | None:
            return row.train_ms if key == "train_ms" else row.extra[key]

        timed_rows = [row for row in rows if row.library == "transformers" and value(row)]
        fastest = min(timed_rows, key=value) if timed_rows else None
        for row in rows:
            mine = value(row)
            base = value(eager) if eager is not None else None
            row.extra[f"{measure}_speedup_vs_eager"] = base / mine if mine and base else None
            best = value(fastest) if fastest is not None else None
            row.extra[f"{measure}_speedup_vs_fastest"] = best / mine if mine and best else None
            row.extra[f"{measure}_fastest_transformers"] = fastest.impl if fastest is not None else None


def _moekit_summary(rows: list[HFRow]) -> dict[str, dict]:
    """Per moekit row and measure: transformers' fastest implementation and moekit's speed-up over it and eager."""
    summary = {}
    for row in rows:
        if row.library != "moekit":
            continue
        summary[row.impl] = {measure: {"fastest_transformers": row.extra[f"{measure}_fastest_transformers"],
                                       "speedup_vs_fastest": row.extra[f"{measure}_speedup_vs_fastest"],
                                       "speedup_vs_eager": row.extra[f"{measure}_speedup_vs_eager"]}
                             for measure in ("train", "prefill", "decode")}
    return summary


# ---------------------------------------------------------------------------------------------- one family
def _bench_family(tf: SimpleNamespace, model_type: str, names: list[str], env: Env, repeats: int, quick: bool,
                  train_shape: tuple[int, int], decode_shape: tuple[int, int], optimizer: bool) -> dict:
    notes: list[str] = []
    checks: list[dict] = []
    config = family_config(tf, model_type, quick)
    impls = build_models(tf, config, names, notes)
    architecture = type(impls[0].model).__name__
    shape = describe(impls[0].model, config)
    progress(f"  [{model_type}] {architecture}, {shape['parameters'] / 1e6:.1f}M parameters: checking "
             f"{len(impls)} implementations against eager ...")

    # ---- checks, fp32 on the device
    check_batch, check_len = QUICK_CHECK_SHAPE if quick else CHECK_SHAPE
    generator = torch.Generator().manual_seed(SEED + 1)
    check_ids = torch.randint(0, config.vocab_size, (check_batch, check_len), generator=generator).to(env.device)
    prompt_len, new_tokens = decode_shape
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=generator).to(env.device)
    reference = impls[0]
    for impl in impls:
        impl.model.to(env.device)
    expected = training_grads(reference.model, check_ids)
    kept = [reference]
    for impl in impls[1:]:
        try:
            checks.append(check_training(reference, impl, check_ids, expected))
        except AssertionError:
            raise
        except Exception as error:  # e.g. an implementation that needs a GPU, bf16 or a package this machine lacks
            notes.append(f"{impl.label}: skipped, its training forward raised {type(error).__name__}: "
                         f"{first_line(error)}")
            continue
        kept.append(impl)
    decode_seconds: dict[str, float] = {}
    tokens: dict[str, Tensor] = {}
    decoding = []
    for impl in kept:
        impl.model.eval()
        call = generator_call(_as_candidate(impl, architecture), prompt, new_tokens)
        try:
            decode_seconds[impl.name], tokens[impl.name] = timed_result(call, env.sync)
        except Exception as error:
            if impl is reference:
                raise
            notes.append(f"{impl.label}: decoding skipped, generate raised {type(error).__name__}: "
                         f"{first_line(error)}")
            continue
        if impl is not reference:
            ties = compare_tokens(tokens[reference.name], tokens[impl.name], reference.model, prompt_len, impl.label)
            notes.extend(ties)
            agree = int((tokens[impl.name][:, prompt_len:] == tokens[reference.name][:, prompt_len:]).sum())
            checks.append({"what": f"{impl.label}: greedy tokens equal to [eager]'s ({agree} of {new_tokens} new "
                                   "tokens" + (", the rest after a tie)" if ties else ")"), "ties": len(ties),
                           "passed": True})
        decoding.append(impl)

    # ---- timing, in the device's dtype
    batch, seq_len = train_shape
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator).to(env.device)
    available = env.available_bytes()
    rows = {impl.name: HFRow(impl.name, impl.library) for impl in kept}
    losses: dict[str, list[float]] = {}
    timers: list[Timer] = []
    first_step: dict[str, float] = {}
    # moekit first: its first step is the yardstick of `is_slow`
    for impl in sorted(kept, key=lambda i: i.library != "moekit"):
        model, row = impl.model.to(env.device, env.dtype), rows[impl.name]
        need = training_step_gathered_bytes(model, impl.name, batch * seq_len, env)
        note = training_step_skip_note(impl.label, need, batch * seq_len, available)
        if note:
            notes.append(note)
            continue
        parameters = list(model.parameters())
        opt = (make_adamw(parameters, lr=LEARNING_RATE) if optimizer
               else SimpleNamespace(step=lambda: None, zero_grad=model.zero_grad))
        losses[impl.name] = []
        step = recording_training_step(model, opt, ids, losses[impl.name])
        model.train()
        try:
            first = timed(step, env.sync)
        except Exception as error:
            if impl.library == "moekit" or impl is reference:
                raise
            notes.append(f"{impl.label}: training step skipped, it raised {type(error).__name__}: "
                         f"{first_line(error)}")
            continue
        row.first_loss = losses[impl.name][0]
        first_step[impl.name] = first
        yardstick = min((first_step[i.name] for i in kept if i.library == "moekit" and i.name in first_step),
                        default=first)
        if impl.library != "moekit" and is_slow(first, yardstick):
            row.train_timed_once, row.train_ms = True, first * 1e3
        else:
            timers.append(Timer(row, "train_ms", step, model.train))
    _check_first_losses(rows, reference.name, env, checks)
    moekit_decode = min((decode_seconds[i.name] for i in decoding if i.library == "moekit"), default=None)
    for impl in decoding:
        row = rows[impl.name]
        candidate = _as_candidate(impl, architecture)
        one = generator_call(candidate, prompt, 1)
        full = generator_call(candidate, prompt, new_tokens)
        if impl.library != "moekit" and moekit_decode and is_slow(decode_seconds[impl.name], moekit_decode):
            impl.model.eval()
            row.decode_timed_once = True
            row.one_ms, row.all_ms = timed(one, env.sync) * 1e3, timed(full, env.sync) * 1e3
        else:
            timers += [Timer(row, "one_ms", one, impl.model.eval), Timer(row, "all_ms", full, impl.model.eval)]
    progress(f"  [{model_type}] timing {len(timers)} measurements in {WARMUP + repeats} interleaved rounds ...")
    run_interleaved(timers, repeats, env.sync)
    measure_peak_memory(timers, env)
    ordered = [rows[impl.name] for impl in kept]
    add_hf_ratios(ordered, batch * seq_len, new_tokens)
    return {"family": model_type, "architecture": architecture, "config_class": BENCH_FAMILIES[model_type].config_class,
            "scaled_from": BENCH_FAMILIES[model_type].scaled_from, "shape": shape,
            "config": {key: getattr(config, key, value) for key, value in BENCH_FAMILIES[model_type].sizes.items()},
            "batch_size": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
            "prompt_tokens": prompt_len, "new_tokens": new_tokens, "optimizer_step": optimizer,
            "implementations": [impl.name for impl in impls], "checks": checks, "notes": notes,
            "rows": [row.as_dict() for row in ordered], "moekit": _moekit_summary(ordered)}


def _check_first_losses(rows: dict[str, HFRow], reference: str, env: Env, checks: list[dict]) -> None:
    """Every timed model's first training step (same weights still) has eager's loss: fp32 within 1e-4 relative;
    bf16 within its rounding (a few parts in a thousand)."""
    expected = rows[reference].first_loss
    if expected is None:
        return
    tol = 1e-4 if env.dtype == torch.float32 else 2e-2
    for name, row in rows.items():
        if name == reference or row.first_loss is None:
            continue
        if not math.isclose(row.first_loss, expected, rel_tol=tol, abs_tol=tol):
            raise AssertionError(f"[{name}]: the first timed training step's loss is {row.first_loss:.6f}, eager's "
                                 f"{expected:.6f}: the timed models do not compute the same function")
        checks.append({"what": f"[{name}]: first timed training step's loss equal to [eager]'s "
                               f"({row.first_loss:.6f} vs {expected:.6f})", "passed": True})


# ---------------------------------------------------------------------------------------------- output
def print_family(result: dict, env: Env, print_fn: Callable[..., Any]) -> None:
    shape = result["shape"]
    print_fn(f"\nFamily {result['family']} ({result['architecture']}, {shape['parameters'] / 1e6:.1f}M parameters; "
             f"proportions of {result['scaled_from']}): hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
             f"layers ({shape['moe_layers']} MoE), {shape['num_experts']} experts top-{shape['top_k']}, expert "
             f"width {shape['expert_width']}, vocab {shape['vocab_size']}")
    print_fn(f"  train: batch {result['batch_size']} x {result['seq_len']} = {result['tokens_per_step']:,} tokens; "
             f"decode: batch 1, prompt {result['prompt_tokens']}, {result['new_tokens']} new tokens")
    headers = ["experts implementation", "train ms", "train tok/s", "vs eager", "vs fastest transformers",
               "prefill ms", "decode ms/token", "vs eager (decode)", "vs fastest (decode)"]
    if env.cuda:
        headers += ["train peak MiB"]
    table = []
    for row in result["rows"]:
        mark = " (timed once)" if row["train_timed_once"] or row["decode_timed_once"] else ""
        cells = [f"[{row['experts_implementation']}]{mark}", fmt(row["train_ms"]),
                 fmt(row["train_tokens_per_s"], "{:,.0f}"), fmt(row["train_speedup_vs_eager"], "{:.2f}x"),
                 fmt(row["train_speedup_vs_fastest"], "{:.2f}x"), fmt(row["prefill_ms"]),
                 fmt(row["decode_ms_per_token"], "{:.2f}"), fmt(row["decode_speedup_vs_eager"], "{:.2f}x"),
                 fmt(row["decode_speedup_vs_fastest"], "{:.2f}x")]
        if env.cuda:
            cells.append(fmt(row["train_peak_mib"]))
        table.append(cells)
    print_rows(headers, table, print_fn)
    for impl, measures in result["moekit"].items():
        parts = []
        for measure, item in measures.items():
            if item["speedup_vs_fastest"] is not None:
                parts.append(f"{measure} {item['speedup_vs_fastest']:.2f}x [{item['fastest_transformers']}]")
        print_fn(f"  [{impl}] over transformers' fastest: {', '.join(parts) or '-'}")
    print_checks_and_notes(result, print_fn)


# ---------------------------------------------------------------------------------------------- entry point
def run_hf_benchmark(families: Iterable[str] | None = DEFAULT_FAMILIES, device: str = "cpu", threads: int = 2,
                     repeats: int = HF_REPEATS, quick: bool = False,
                     train_shape: tuple[int, int] | None = None, decode_shape: tuple[int, int] | None = None,
                     implementations: Iterable[str] | None = None, optimizer: bool = True,
                     json_path: str | Path | None = None, print_fn: Callable[..., Any] = print) -> dict:
    """Time a training step and greedy decoding of transformers' MoE models under every experts implementation.

    Args:
        families: transformers model_types from `BENCH_FAMILIES` (default qwen3_moe, olmoe, gpt_oss).
        device: "cpu" (fp32) or "cuda" (checks in fp32, timing in bf16).
        threads: torch CPU threads during the run (restored afterwards).
        repeats: interleaved timed rounds after `WARMUP` untimed ones; medians are reported.
        quick: tiny shapes (`QUICK_SIZES`), short inputs and at most 2 rounds: a smoke run for tests and CI.
        train_shape: (batch, sequence length) of the training step (default 8 x 256; quick 2 x 16).
        decode_shape: (prompt tokens, new tokens) of greedy decoding, batch 1 (default 32, 32; quick 8, 4).
        implementations: experts implementations to run (default: eager, every one transformers registers, and
            moekit's "moekit"); eager is always included, as every check's reference.
        optimizer: include the AdamW step in the training step.
        json_path: also write the returned dict there (atomically).
        print_fn: where the tables go.

    Returns:
        ``{"benchmark": "hf", "machine", "device", "dtype", "repeats", "warmup", "loss_rule", "results"}`` with one
        result per family: its shape, checks, notes, rows (medians, tokens/s, speed-ups over eager and over
        transformers' fastest row per measure) and moekit's summary.

    Raises:
        ValueError: an unknown family or implementation, a bad device or shape.
        ImportError: transformers (>= 5) is not installed.
        AssertionError: an implementation's outputs, gradients or greedy tokens differ from eager's.
    """
    env = bench_env(device)
    names = resolve_families(families)
    tf = load_transformers()
    from .. import hf as moekit_hf  # registers moekit's implementations; ImportError for transformers < 5

    check_json_path(json_path)
    repeats = resolve_repeats(repeats, quick)
    train_shape = tuple(train_shape or (QUICK_TRAIN_SHAPE if quick else TRAIN_SHAPE))
    decode_shape = tuple(decode_shape or (QUICK_DECODE_SHAPE if quick else DECODE_SHAPE))
    if len(train_shape) != 2 or min(train_shape) < 1:
        raise ValueError(f"train_shape must be (batch, sequence length), both positive, got {train_shape}")
    if len(decode_shape) != 2 or decode_shape[0] < 1 or decode_shape[1] < 2:
        raise ValueError(f"decode_shape must be (prompt tokens >= 1, new tokens >= 2), got {decode_shape}")
    known = transformers_implementations(tf) + list(moekit_hf.IMPLEMENTATIONS)
    chosen = [*transformers_implementations(tf), MOEKIT_DEFAULT] if implementations is None else list(implementations)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"unknown experts implementation {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(known)}")
    chosen = ["eager", *[name for name in dict.fromkeys(chosen) if name != "eager"]]

    with bench_context(threads, env), quiet_transformers(tf):
        info = header("transformers' MoE models under every experts implementation: training step and greedy "
                      "decoding", env, tf, threads, repeats, print_fn)
        print_fn(f"  implementations: {', '.join(chosen)} (eager = the family's own expert loop; moekit = "
                 "moekit.hf's experts_implementation)")
        print_fn(f"  {HF_LOSS_RULE}")
        print_fn("  decode: model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N), default cache; "
                 "prefill ms = generate 1 token; decode ms/token = (time(N) - time(1)) / (N - 1).")
        print_fn("  vs eager / vs fastest transformers = that row's time / this row's (> 1: this row is faster); "
                 "checks against eager first (fp32).")
        print_fn(f"  (timed once): a row over {SLOW_FACTOR:g}x moekit's time and {SLOW_SECONDS:g} s is not "
                 "repeated; its first call is its time.")
        results = []
        for model_type in names:
            result = _bench_family(tf, model_type, chosen, env, repeats, quick, train_shape, decode_shape, optimizer)
            print_family(result, env, print_fn)
            results.append(result)
        footer(info, env, print_fn)
    output = {"benchmark": "hf", "machine": info, "device": env.device.type,
              "dtype": str(env.dtype).removeprefix("torch."), "repeats": repeats, "warmup": WARMUP,
              "loss_rule": HF_LOSS_RULE, "results": results}
    write_result(json_path, output, print_fn)
    return output
