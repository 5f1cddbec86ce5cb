"""End-to-end benchmark: a training step and an inference forward of moekit presets against transformers.

`run_model_benchmark` times, in one run and round-robin (`run_interleaved`), for each preset:

* ``moekit``: the preset's `MoETransformer`;
* the transformers model that computes exactly the same function, loaded from `export_hf`'s folder with the
  same weights (``tiny-mixtral`` -> `MixtralForCausalLM`, ``tiny-deepseek`` -> `Glm4MoeForCausalLM`, whose
  DeepSeek-V3 routing with standard attention is the exact twin), once per experts implementation that
  transformers registers (``eager`` plus `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`); the logits and
  the cross-entropy are checked equal to moekit's (fp32, atol = rtol = 1e-4) before anything is timed;
* ``floor``: the dense floor, moekit's `MoETransformer` with every MoE layer's FFN replaced by one dense SwiGLU FFN
  of the active width (k x moe_intermediate_size + the shared experts' width): the same attention, embedding and
  active FFN FLOPs with no router, balancing, dispatch or combine. Every row's time over the floor's is the
  price of sparsity it pays (the issue's physical floor, at model scale);
* for DeepSeek-V3-style presets also `DeepseekV3ForCausalLM` (what the speed issue names), built from a
  `DeepseekV3Config` with the preset's sizes and routing. Its attention is multi-head latent attention (MLA),
  which standard attention cannot be written into, so its weights are random and only a finite loss (and the
  agreement of its experts implementations with each other) is checked. The MLA sizes are chosen by
  `mla_dims` so that its attention has the parameter count (hence the projection FLOPs) of the preset's
  standard attention and the same query/key and value widths per head.

A training step is: forward on ``[batch, block]`` token ids with next-token targets, loss, backward, AdamW step,
``zero_grad``. The loss is the cross-entropy plus the balancing losses each library adds in training for this
configuration (see `MODEL_LOSS_RULE`). The inference row is a forward under ``torch.no_grad()`` in eval mode, logits
for every position, no KV cache. On CPU everything is fp32; with ``device="cuda"`` the checks run in fp32 and
the timing in bf16 (parameters cast, AdamW on bf16 parameters), with the peak memory of one call per row.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..interop.hf import export_hf
from ..layer import update_aux_free_biases
from ..model.transformer import DenseMLP, MoETransformer
from ..train.config import RunConfig
from ..train.optim import build_optimizer
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
    saved_tensors_mib,
    timed,
    training_step_skip_note,
    uses_router_loss,
    write_result,
)

DEFAULT_PRESETS = ("tiny-mixtral", "tiny-deepseek")
MODEL_REPEATS = 10  # the model benchmark's default timed rounds
QUICK_BATCH, QUICK_BLOCK = 2, 32

MODEL_LOSS_RULE = (
    "loss = next-token cross-entropy + the balancing losses each library adds in training for this config: "
    "moekit adds MoEOutput.aux_loss (what `moekit train` minimises: every term whose coefficient is > 0) and "
    "updates the aux-free router bias after the optimiser step; transformers adds its load-balancing loss where "
    "its architecture has one and router_aux_loss_coef > 0 (Mixtral, via output_router_logits=True; "
    "Glm4-MoE and DeepSeek-V3 compute none in transformers). Both sides: the same torch.optim.AdamW as "
    "`moekit train` (fused=True where torch has the kernel) with the preset's lr, betas and weight decay, no "
    "clipping, zero_grad(set_to_none=True)."
)


# ---------------------------------------------------------------------------------------------- presets
def load_preset(name: str) -> RunConfig:
    """The `RunConfig` of a preset shipped in `moekit/configs/` (ValueError naming the choices otherwise)."""
    folder = resources.files("moekit.configs")
    names = sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(names)}")
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - yaml is in the train extra
        raise ImportError("reading presets needs PyYAML: pip install pyyaml") from error
    return RunConfig.from_dict(yaml.safe_load(folder.joinpath(f"{name}.yaml").read_text()))


def resolve_runs(presets: Iterable[str | RunConfig] | None) -> list[RunConfig]:
    """Preset names (or ready `RunConfig`s, e.g. tiny ones for tests) -> run configs of MoE models."""
    entries = list(DEFAULT_PRESETS if presets is None else presets)
    if not entries:
        raise ValueError("presets is empty; name at least one MoE preset, e.g. tiny-mixtral")
    runs = []
    for entry in entries:
        run = load_preset(entry.strip()) if isinstance(entry, str) else entry
        if not isinstance(run, RunConfig):
            raise TypeError(f"presets takes preset names or RunConfig objects, got {type(entry).__name__}")
        if run.model.moe is None:
            raise ValueError(f"preset {run.name!r} is a dense model; the model benchmark compares MoE presets "
                             "(e.g. tiny-mixtral, tiny-deepseek)")
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------- transformers
def load_exported(tf: SimpleNamespace, path: Path, impl: str) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` in fp32 with the given experts implementation."""
    return tf.module.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation=impl)


def mla_dims(run: RunConfig) -> dict[str, int | None]:
    """DeepSeek-V3 MLA sizes that match the preset's standard attention as closely as possible.

    Standard attention has q/o projections of heads * head_dim and k/v projections of kv_heads * head_dim. MLA
    here gets no query compression (``q_lora_rank=None``, so q_proj has the same size), per-head query/key width
    ``qk_nope_head_dim + qk_rope_head_dim = head_dim`` (rope half of it), ``v_head_dim = head_dim`` (so the score
    and value FLOPs and o_proj are the same), and the ``kv_lora_rank`` r for which the latent path
    ``H * (r + rope) + r * heads * (nope + v)`` has the parameters of standard k/v, ``2 * H * kv_heads * head_dim``.
    """
    m = run.model
    hidden, heads, head_dim = m.hidden_size, m.num_attention_heads, m.attention_head_dim
    rope = max(2, (head_dim // 2) // 2 * 2)  # even, as the rotary embedding needs
    nope = head_dim - rope
    target = 2 * hidden * m.kv_heads * head_dim
    rank = max(1, round((target - hidden * rope) / (hidden + heads * (nope + head_dim))))
    return {"q_lora_rank": None, "kv_lora_rank": rank, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
            "v_head_dim": head_dim}


def attention_parameters(run: RunConfig) -> tuple[int, int]:
    """(standard attention, the `mla_dims` MLA) parameters per layer, the MLA latent norm included."""
    m, d = run.model, mla_dims(run)
    hidden, heads, head_dim = m.hidden_size, m.num_attention_heads, m.attention_head_dim
    standard = 2 * hidden * heads * head_dim + 2 * hidden * m.kv_heads * head_dim
    rank, rope, nope, v = d["kv_lora_rank"], d["qk_rope_head_dim"], d["qk_nope_head_dim"], d["v_head_dim"]
    q_and_o = hidden * heads * (nope + rope) + heads * v * hidden
    mla = q_and_o + hidden * (rank + rope) + rank + rank * heads * (nope + v)  # latent in, its norm, latent out
    return standard, mla


def deepseek_v3_config(tf: SimpleNamespace, run: RunConfig, hf_config: Any) -> Any:
    """A `DeepseekV3Config` with the preset's sizes and routing (as its Glm4-MoE export has them) and MLA sizes
    from `mla_dims`; `hf_config` is the exported Glm4-MoE config (shared expert count, groups, dense layers)."""
    m, moe = run.model, run.model.moe
    return tf.module.DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        moe_intermediate_size=moe.moe_intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        n_shared_experts=hf_config.n_shared_experts, n_routed_experts=moe.num_local_experts,
        routed_scaling_factor=moe.routed_scaling_factor, n_group=hf_config.n_group,
        topk_group=hf_config.topk_group, num_experts_per_tok=moe.num_experts_per_tok,
        first_k_dense_replace=hf_config.first_k_dense_replace, norm_topk_prob=moe.resolved_norm_topk_prob,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps,
        initializer_range=m.initializer_range, tie_word_embeddings=m.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, **mla_dims(run))


# ---------------------------------------------------------------------------------------------- candidates
@dataclass
class ModelCandidate:
    """One model to time: moekit's, an exported transformers twin, or DeepseekV3 with random weights."""

    label: str
    library: str  # "moekit", "floor" (moekit's dense twin) or "transformers"
    architecture: str
    impl: str | None
    model: nn.Module
    same_weights: bool  # the weights are moekit's (exported), so outputs must agree

    @property
    def family(self) -> str:
        return f"{self.library} {self.architecture}"

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class Prepared:
    """A preset's models, ready to check and time."""

    run: RunConfig
    export_arch: str
    candidates: list[ModelCandidate]
    notes: list[str] = field(default_factory=list)


def build_moekit_model(run: RunConfig) -> MoETransformer:
    """The preset's `MoETransformer`, seeded, fp32."""
    torch.manual_seed(SEED)
    return MoETransformer(run.model)


def floor_width(run: RunConfig) -> int:
    """The active FFN width of one MoE layer: k routed experts' widths plus the shared experts' width.

    Raises ValueError for routing with no fixed k per token (expert choice, Soft MoE): no dense FFN has its FLOPs.
    """
    moe = run.model.moe
    if moe is None or moe.router in ("expert_choice", "soft"):
        raise ValueError(f"preset {run.name!r}: the dense floor needs a token-choice MoE (a fixed k per token)")
    return moe.num_experts_per_tok * moe.moe_intermediate_size + moe.resolved_shared_intermediate_size


def build_floor(run: RunConfig) -> MoETransformer:
    """The dense floor: the preset's model with each MoE layer's FFN a dense SwiGLU FFN of `floor_width`.

    Attention, norms, embedding and the dense layers are the preset's; only the MoE FFNs change, so the step
    does the MoE model's active FLOPs (routers aside) with no routing, balancing, dispatch or combine.
    """
    torch.manual_seed(SEED)
    model = MoETransformer(run.model)
    width = floor_width(run)
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp, layer.is_moe = DenseMLP(run.model.hidden_size, width), False
    model.reset_parameters()
    return model


def prepare(run: RunConfig, tf: SimpleNamespace, workdir: Path) -> Prepared:
    """moekit's model, its exported transformers twin under every experts implementation that loads, and, for
    DeepSeek-V3-style routing, DeepseekV3ForCausalLM under each implementation (random weights), all fp32 on CPU.

    Raises ValueError (from `export_hf`, with the reason) for a preset no transformers architecture computes.
    """
    model = build_moekit_model(run)
    folder = workdir / run.name
    try:
        export_hf(model, folder, overwrite=True)
    except ValueError as error:
        raise ValueError(f"preset {run.name!r} has no transformers twin to compare with: {error}") from error
    arch = str(tf.module.AutoConfig.from_pretrained(folder).architectures[0])
    prepared = Prepared(run, arch, [ModelCandidate("moekit", "moekit", "MoETransformer", None, model, True),
                                    ModelCandidate(f"floor (dense FFN {floor_width(run)})", "floor", "MoETransformer",
                                              None, build_floor(run), False)])
    for impl in tf.implementations:
        label = f"transformers {arch} [{impl}]"
        try:
            hf = load_exported(tf, folder, impl)
        except Exception as error:  # an implementation this machine cannot load
            prepared.notes.append(f"{label}: skipped, loading raised {type(error).__name__}: {first_line(error)}")
            continue
        prepared.candidates.append(ModelCandidate(label, "transformers", arch, impl, hf, True))
    if arch == "Glm4MoeForCausalLM":  # DeepSeek-V3 routing: add the architecture the issue names (MLA)
        config = deepseek_v3_config(tf, run, tf.module.AutoConfig.from_pretrained(folder))
        reference: nn.Module | None = None
        for impl in tf.implementations:
            label = f"transformers DeepseekV3ForCausalLM [{impl}]"
            try:
                impl_config = copy.deepcopy(config)
                impl_config._experts_implementation = impl
                torch.manual_seed(SEED)
                hf = tf.module.DeepseekV3ForCausalLM(impl_config)
                if reference is not None:
                    hf.load_state_dict(reference.state_dict())
            except Exception as error:
                prepared.notes.append(f"{label}: skipped, construction raised {type(error).__name__}: "
                                      f"{first_line(error)}")
                continue
            if reference is None:
                reference = hf
            prepared.candidates.append(ModelCandidate(label, "transformers", "DeepseekV3ForCausalLM", impl, hf.eval(),
                                                 False))
        standard, mla = attention_parameters(run)
        dims = mla_dims(run)
        prepared.notes.append(
            f"DeepseekV3ForCausalLM uses multi-head latent attention, not moekit's standard attention: random "
            f"weights (no output of moekit's to compare with), q_lora_rank=None, kv_lora_rank={dims['kv_lora_rank']}, "
            f"qk_nope_head_dim={dims['qk_nope_head_dim']} + qk_rope_head_dim={dims['qk_rope_head_dim']} = head_dim "
            f"{run.model.attention_head_dim}, v_head_dim={dims['v_head_dim']}: {mla:,} attention parameters per "
            "layer vs "
            f"{standard:,} standard ({100 * (mla - standard) / standard:+.2f}%), same score/value widths")
    moe = run.model.moe
    shared = moe.resolved_shared_intermediate_size
    if arch == "Glm4MoeForCausalLM" and shared and shared % moe.moe_intermediate_size:
        padded = math.ceil(shared / moe.moe_intermediate_size) * moe.moe_intermediate_size
        prepared.notes.append(
            f"transformers' shared expert width is n_shared_experts x moe_intermediate_size: moekit's shared expert "
            f"(width {shared}) is exported as width {padded} with zero units (same outputs); its transformers rows "
            f"compute the {padded - shared} extra units")
    return prepared


def forward_logits(candidate: ModelCandidate, ids: Tensor) -> Tensor:
    """Logits of every position, eval mode, no grad, no cache."""
    candidate.model.eval()
    with torch.no_grad():
        if candidate.library != "transformers":
            return candidate.model(ids).logits
        return candidate.model(input_ids=ids, use_cache=False).logits


def assert_logits_equal(actual: Tensor, expected: Tensor, what: str) -> float:
    """fp32 equality within atol = rtol = 1e-4; returns the largest absolute difference."""
    diff = (actual.float() - expected.float()).abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: logits differ although the weights are the same. {m}")
    return diff


def training_loss_with_targets(candidate: ModelCandidate, x: Tensor, y: Tensor,
                               router_loss: bool | None = None) -> Tensor:
    """The step's loss on inputs `x` and next-token targets `y` (see `MODEL_LOSS_RULE`); `router_loss=False` gives
    transformers' plain cross-entropy."""
    if candidate.library != "transformers":
        out = candidate.model(x, targets=y)
        return out.loss + out.aux_loss
    if router_loss is None:
        router_loss = uses_router_loss(candidate.model)
    extra = {"output_router_logits": True} if router_loss else {}
    # shift_labels: y is already the next token of each position, as moekit's targets are
    return candidate.model(input_ids=x, labels=y, shift_labels=y, use_cache=False, **extra).loss


def candidate_training_step(candidate: ModelCandidate, optimizer: torch.optim.Optimizer, x: Tensor,
                  y: Tensor) -> Callable[[], None]:
    """A closure running one full training step of `candidate` (forward, loss, backward, AdamW, zero_grad)."""
    model = candidate.model

    def run() -> None:
        training_loss_with_targets(candidate, x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if candidate.library == "moekit":
            update_aux_free_biases(model)

    return run


def inference_forward(candidate: ModelCandidate, x: Tensor) -> Callable[[], None]:
    model = candidate.model

    def run() -> None:
        with torch.no_grad():
            if candidate.library != "transformers":
                model(x)
            else:
                model(input_ids=x, use_cache=False)

    return run


def training_step_bytes(run: RunConfig, impl: str | None, tokens: int, env: Env) -> int:
    """Rough peak of the weights transformers' batched_mm gathers in a training step of the preset
    (`gathered_weight_bytes`: gate_up + down = 3 * I * H elements per (token, expert) pair)."""
    moe = run.model.moe
    if moe is None:
        return 0
    moe_layers = sum(run.model.is_moe_layer(i) for i in range(run.model.num_hidden_layers))
    return gathered_weight_bytes(impl, tokens, moe.num_experts_per_tok, 3 * moe.moe_intermediate_size
                                 * run.model.hidden_size, env.dtype, moe_layers=moe_layers, backward=True)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class ModelRow:
    label: str
    library: str
    architecture: str
    impl: str | None
    parameters: int
    train_ms: float | None = None
    fwd_ms: float | None = None
    train_peak_mib: float | None = None  # CUDA only
    fwd_peak_mib: float | None = None
    saved_mib: float | None = None  # activation memory of the training step (`saved_activation_mib`)
    timed_once: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The row as the JSON result holds it."""
        return {"label": self.label, "library": self.library, "architecture": self.architecture,
                "experts_implementation": self.impl, "parameters": self.parameters, "train_ms": self.train_ms,
                "fwd_ms": self.fwd_ms, "train_peak_mib": self.train_peak_mib, "fwd_peak_mib": self.fwd_peak_mib,
                "saved_mib": self.saved_mib, "timed_once": self.timed_once, **self.extra}


def _check_candidates(prepared: Prepared, x: Tensor, y: Tensor, checks: list[dict]) -> list[ModelCandidate]:
    """Run every equality check on [batch, block] inputs (fp32); drop candidates that cannot run, with a note.

    Exported twins: logits and plain cross-entropy equal to moekit's. DeepseekV3: loss finite, and every
    experts implementation's logits equal to the first one's. An AssertionError (a real mismatch) propagates.
    """
    reference = prepared.candidates[0]
    expected_logits = forward_logits(reference, x)  # eval mode: no aux-free load counting during the checks
    with torch.no_grad():
        expected_loss = reference.model(x, targets=y).loss
    kept = [reference]
    deepseek_reference: Tensor | None = None
    for candidate in prepared.candidates[1:]:
        if candidate.library == "floor":  # a different (dense) function: nothing to compare its outputs with
            kept.append(candidate)
            continue
        try:
            logits = forward_logits(candidate, x)
            with torch.no_grad():
                loss = training_loss_with_targets(candidate, x, y, router_loss=False)
                full_loss = training_loss_with_targets(candidate, x, y)
        except AssertionError:
            raise
        except Exception as error:  # e.g. an implementation that needs bf16 or a package this machine lacks
            prepared.notes.append(f"{candidate.label}: skipped, running it raised {type(error).__name__}: "
                                  f"{first_line(error)}")
            continue
        if not torch.isfinite(full_loss):
            raise AssertionError(f"{candidate.label}: the training loss is {full_loss.item()}, not finite")
        if candidate.same_weights:
            diff = assert_logits_equal(logits, expected_logits, f"{prepared.run.name}: {candidate.label} vs moekit")
            torch.testing.assert_close(
                loss.float(), expected_loss.float(), atol=LOSS_ATOL, rtol=0,
                msg=lambda m, c=candidate: f"{c.label}: cross-entropy differs from moekit's. {m}")
            checks.append({"what": f"{candidate.label}: logits and cross-entropy equal to moekit's (same weights)",
                           "max_abs_diff": diff, "atol": ATOL, "passed": True})
        else:
            what = f"{candidate.label}: training loss finite ({full_loss.item():.4f})"
            if deepseek_reference is None:
                deepseek_reference = logits
                diff = 0.0
            else:
                diff = assert_logits_equal(logits, deepseek_reference, f"{candidate.label} vs its first implementation")
                what += ", logits equal to the first experts implementation's"
            checks.append({"what": what, "max_abs_diff": diff, "atol": ATOL, "passed": True})
        kept.append(candidate)
    return kept


def _bench_model_preset(prepared: Prepared, env: Env, repeats: int, batch: int, block: int) -> dict:
    run = prepared.run
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, run.model.vocab_size, (batch, block + 1), generator=generator)
    x, y = ids[:, :-1].contiguous().to(env.device), ids[:, 1:].contiguous().to(env.device)
    checks: list[dict] = []
    for candidate in prepared.candidates:
        candidate.model.to(env.device)
    candidates = _check_candidates(prepared, x, y, checks)

    rows: list[ModelRow] = []
    timers: list[Timer] = []
    reference: dict[str, float] = {}
    available = env.available_bytes()
    for candidate in candidates:
        model = candidate.model.to(env.device, env.dtype)
        row = ModelRow(candidate.label, candidate.library, candidate.architecture, candidate.impl,
                       candidate.parameters)
        rows.append(row)
        forward = inference_forward(candidate, x)
        progress(f"  [{run.name}] {candidate.label} ...")
        model.eval()
        try:
            first_fwd = timed(forward, env.sync)
        except Exception as error:  # e.g. out of memory at the benchmark's shape (it passed the checks' run)
            _skip(prepared, candidate, "its forward", error, env)
            continue
        reference.setdefault("fwd", first_fwd)
        if candidate.library != "moekit" and is_slow(first_fwd, reference["fwd"]):
            row.timed_once = True  # too slow to repeat in every round: this measured call is its time
            row.fwd_ms = first_fwd * 1e3
        else:
            timers.append(Timer(row, "fwd_ms", forward, model.eval))
        need = training_step_bytes(run, candidate.impl, batch * block, env)
        note = training_step_skip_note(candidate.label, need, batch * block, available)
        if note:
            prepared.notes.append(note)
            continue
        optimizer = build_optimizer(model, run)
        step = candidate_training_step(candidate, optimizer, x, y)
        model.train()
        try:
            row.saved_mib = saved_tensors_mib(lambda c=candidate: training_loss_with_targets(c, x, y), model)
            first = timed(step, env.sync)  # the first step also creates the optimiser state
        except Exception as error:
            row.saved_mib = None
            _skip(prepared, candidate, "its training step", error, env)
            continue
        reference.setdefault("train", first)
        if candidate.library != "moekit" and is_slow(first, reference["train"]):
            row.timed_once = True
            row.train_ms = first * 1e3
        else:
            timers.append(Timer(row, "train_ms", step, model.train))
    progress(f"  [{run.name}] timing {len(timers)} measurements in {WARMUP + repeats} interleaved rounds ...")
    run_interleaved(timers, repeats, env.sync)
    measure_peak_memory(timers, env)
    _add_model_ratios(rows, batch * block)
    return {"preset": run.name, "export_architecture": prepared.export_arch, "batch_size": batch,
            "block_size": block, "tokens_per_step": batch * block, "checks": checks, "notes": prepared.notes,
            "rows": [r.as_dict() for r in rows], "best": _fastest_training_per_architecture(rows)}


def _skip(prepared: Prepared, candidate: ModelCandidate, what: str, error: Exception, env: Env) -> None:
    if candidate.library != "transformers":
        raise error  # moekit and its floor are the baselines of the ratios: nothing to compare without them
    prepared.notes.append(f"{candidate.label}: {what} skipped, it raised {type(error).__name__}: "
                          f"{first_line(error)}")
    if env.cuda:  # e.g. out of memory: give the cached blocks back before the next row
        torch.cuda.empty_cache()


def _add_model_ratios(rows: list[ModelRow], tokens: int) -> None:
    """Per row and kind (train, fwd): tokens/s, moekit's speed-up (row time / moekit's) and the row's time over
    the dense floor's (`*_vs_floor`; 1.0 would be sparsity for free)."""
    moekit = rows[0]
    floor = next((row for row in rows if row.library == "floor"), None)
    for row in rows:
        for kind in ("train", "fwd"):
            ms = getattr(row, f"{kind}_ms")
            ref = getattr(moekit, f"{kind}_ms")
            base = getattr(floor, f"{kind}_ms") if floor is not None else None
            row.extra[f"{kind}_tokens_per_s"] = tokens / (ms / 1e3) if ms else None
            row.extra[f"{kind}_moekit_speedup"] = ms / ref if ms and ref else None
            row.extra[f"{kind}_vs_floor"] = ms / base if ms and base else None


def _fastest_training_per_architecture(rows: list[ModelRow]) -> dict[str, dict]:
    """Per transformers architecture: its fastest experts implementation for the training step, and moekit's
    speed-up over it (train and fwd)."""
    best: dict[str, dict] = {}
    for row in rows:
        if row.library != "transformers" or row.train_ms is None:
            continue
        current = best.get(row.architecture)
        if current is None or row.train_ms < current["train_ms"]:
            best[row.architecture] = {"experts_implementation": row.impl, "train_ms": row.train_ms,
                                      "moekit_speedup": row.extra["train_moekit_speedup"],
                                      "train_vs_floor": row.extra["train_vs_floor"],
                                      "fwd_moekit_speedup": row.extra["fwd_moekit_speedup"]}
    return best


# ---------------------------------------------------------------------------------------------- output
def _print_model_result(result: dict, env: Env, print_fn: Callable[..., Any]) -> None:
    print_fn(f"\nPreset {result['preset']}: batch {result['batch_size']} x block {result['block_size']} = "
             f"{result['tokens_per_step']:,} tokens per step (exported as {result['export_architecture']})")
    headers = ["model", "params", "train ms", "train tok/s", "moekit speed-up", "x floor", "fwd ms", "fwd tok/s",
               "moekit speed-up (fwd)", "x floor (fwd)", "saved MiB"]
    if env.cuda:
        headers += ["train peak MiB", "fwd peak MiB"]
    table = []
    for row in result["rows"]:
        mark = " (timed once)" if row["timed_once"] else ""
        cells = [row["label"] + mark, f"{row['parameters'] / 1e6:.2f}M", fmt(row["train_ms"]),
                 fmt(row["train_tokens_per_s"], "{:,.0f}"), fmt(row["train_moekit_speedup"], "{:.2f}x"),
                 fmt(row["train_vs_floor"], "{:.2f}x"), fmt(row["fwd_ms"]), fmt(row["fwd_tokens_per_s"], "{:,.0f}"),
                 fmt(row["fwd_moekit_speedup"], "{:.2f}x"), fmt(row["fwd_vs_floor"], "{:.2f}x"),
                 fmt(row["saved_mib"])]
        if env.cuda:
            cells += [fmt(row["train_peak_mib"]), fmt(row["fwd_peak_mib"])]
        table.append(cells)
    print_rows(headers, table, print_fn)
    moekit = result["rows"][0]
    for arch, best in result["best"].items():
        print_fn(f"  best {arch}: [{best['experts_implementation']}], moekit training step "
                 f"{best['moekit_speedup']:.2f}x its speed (tokens/s)")
        if best["train_vs_floor"] and moekit["train_vs_floor"]:
            print_fn(f"    training step over the dense floor's: {arch} [{best['experts_implementation']}] "
                     f"{best['train_vs_floor']:.2f}x, moekit {moekit['train_vs_floor']:.2f}x")
    print_checks_and_notes(result, print_fn,
                           lambda check: f" (max |diff| {check['max_abs_diff']:.1e}, atol {check['atol']:g})")


# ---------------------------------------------------------------------------------------------- entry point
def run_model_benchmark(presets: Iterable[str | RunConfig] | None = DEFAULT_PRESETS, device: str = "cpu",
                        threads: int = 2, repeats: int = MODEL_REPEATS, batch_size: int | None = None,
                        block_size: int | None = None, json_path: str | Path | None = None,
                        print_fn: Callable[..., Any] = print, quick: bool = False) -> dict:
    """Time a training step and an inference forward of moekit presets and their transformers counterparts.

    Args:
        presets: preset names (default tiny-mixtral and tiny-deepseek) or `RunConfig`s (e.g. tiny ones).
        device: "cpu" (fp32) or "cuda" (checks in fp32, timing in bf16).
        threads: torch CPU threads during the run (restored afterwards).
        repeats: interleaved timed rounds (after `WARMUP` untimed ones); each row's median is reported.
        batch_size, block_size: the step's shape (default: the preset's `train.batch_size` x `train.block_size`;
            with `quick`, 2 x 32).
        json_path: also write the returned dict there (atomically).
        print_fn: where the tables go.
        quick: at most 2 rounds and a small default shape, for a smoke run.

    Returns:
        ``{"benchmark": "model", "machine", "device", "dtype", "repeats", "warmup", "loss_rule", "results"}``
        with one result per preset: its checks, notes, rows (ms, tokens/s and moekit's speed-up per row:
        row time / moekit's time, > 1 means moekit is faster) and the best experts implementation per
        transformers architecture.

    Raises:
        ValueError: an unknown or dense preset, one with no transformers twin, a bad device or shape.
        ImportError: transformers is not installed.
        AssertionError: a twin's logits or loss differ from moekit's (nothing is timed then).
    """
    env = bench_env(device)
    runs = resolve_runs(presets)
    tf = load_transformers()
    check_json_path(json_path)
    repeats = resolve_repeats(repeats, quick)
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    shapes = []
    for run in runs:
        batch = batch_size or (QUICK_BATCH if quick else run.train.batch_size)
        block = block_size or (QUICK_BLOCK if quick else run.train.block_size)
        if block > run.model.max_position_embeddings:
            raise ValueError(f"block_size={block} exceeds preset {run.name!r}'s max_position_embeddings="
                             f"{run.model.max_position_embeddings}; choose a block of at most that many tokens")
        shapes.append((batch, block))
    with bench_context(threads, env), quiet_transformers(tf), tempfile.TemporaryDirectory() as tmp:
        prepared = [prepare(run, tf, Path(tmp)) for run in runs]  # every preset fails or passes before timing
        info = header("End-to-end model benchmark: training step and inference forward", env, tf, threads,
                      repeats, print_fn)
        print_fn("  train = forward + loss + backward + AdamW step + zero_grad; fwd = inference forward under")
        print_fn("  torch.no_grad() in eval mode, all logits, no cache. moekit speed-up = row time / moekit time")
        print_fn("  (> 1: moekit is faster; equals moekit tokens/s over the row's). saved MiB = activation memory")
        print_fn("  of the training step: tensors autograd keeps for backward, parameters and buffers excluded.")
        print_fn("  floor = the preset with each MoE FFN replaced by a dense SwiGLU FFN of the active width (k x")
        print_fn("  expert width + shared width): same active FLOPs, no routing; x floor = row time / floor time.")
        print_fn(f"  (timed once): a row over {SLOW_FACTOR:g}x moekit's time and {SLOW_SECONDS:g} s is not repeated;"
                 " its first call (after the checks) is its time.")
        print_fn(f"  {MODEL_LOSS_RULE}")
        results = []
        for item, (batch, block) in zip(prepared, shapes, strict=True):
            result = _bench_model_preset(item, env, repeats, batch, block)
            _print_model_result(result, env, print_fn)
            results.append(result)
        footer(info, env, print_fn)
    output = {"benchmark": "model", "machine": info, "device": env.device.type,
              "dtype": str(env.dtype).removeprefix("torch."), "repeats": repeats, "warmup": WARMUP,
              "loss_rule": MODEL_LOSS_RULE, "results": results}
    write_result(json_path, output, print_fn)
    return output
