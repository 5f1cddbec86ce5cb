"""Benchmark one sparse MoE layer: moekit vs transformers' Mixtral block vs a naive loop vs a dense floor.

For each config it times, on the same input and (for the MoE rows) the same weights and routing:

* ``moekit``: ``MoELayer`` with ``expert_backend="auto"`` (what users get), and ``moekit[loop]``,
  ``moekit[bmm]``, ``moekit[grouped_mm]`` forcing each backend. The thresholds "auto" chooses by are in
  `moekit.layer.experts.AUTO_BACKEND_THRESHOLDS`;
* ``transformers[<impl>]``: ``MixtralSparseMoeBlock`` with every experts implementation registered in
  ``transformers.integrations.moe`` ("eager" plus the registered ones); those that raise on the device
  are skipped with a note, and so is any whose estimated memory would not fit. transformers is imported
  lazily (`load_layer_transformers`): without it these rows are skipped with a note and the others still run;
* ``tutel``: Microsoft's Tutel layer (dropless, SwiGLU experts, the same weights; see `moekit.bench.tutel`)
  where tutel is installed (it is not on PyPI: it builds from source), with a note saying how otherwise;
* ``floor``: a dense SwiGLU FFN with the same active width (k * ffn, plus the shared expert's width),
  i.e. the same active expert FLOPs without routing, dispatch or combine;
* ``naive loop``: the hand-written pattern "for each expert, boolean-mask its tokens, F.linear with W[e]".

Before timing, every MoE row is checked against moekit (routing, outputs and gradients), so all rows do
the same work. "fwd" is an inference forward under ``torch.no_grad()``; "fwd+bwd" is a forward with
autograd followed by ``out.backward(grad)`` with a fixed random ``grad`` (the input requires grad too,
as inside a model). Rows are timed round-robin (`run_interleaved`), so a noisy machine slows all alike.

On CPU everything runs in fp32; with ``device="cuda"`` in bf16, with a CUDA synchronisation around
every timed call and the peak memory of one call per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import write_json
from ..config import MoEConfig
from ..layer import MoELayer
from ..model.transformer import DenseMLP as DenseSwiGLU  # the floor: a dense SwiGLU FFN
from .harness import (
    ATOL,
    RTOL,
    WARMUP,
    Env,
    Timer,
    bench_context,
    bench_env,
    calibrate_gflops,
    first_line,
    gathered_weight_bytes,
    load_average,
    load_transformers,
    machine_info,
    measure_peak_memory,
    progress,
    resolve_repeats,
    run_interleaved,
    saved_activation_mib,
)
from .tutel import INSTALL_HINT, build_tutel, load_tutel, tutel_grads

# bf16 keeps 8 significant bits (rounding ~4e-3 relative) and the implementations round their intermediates
# at different points (combine before or after the down projection, accumulation order of the gradients),
# so an elementwise 1e-4 cannot hold. bf16 tensors are compared with rtol = BF16_TOL and an atol of
# BF16_TOL times the reference's largest magnitude: rounding noise passes, a wrong routing, a missing
# term or a wrong gradient (errors of the order of the values themselves) still fails.
BF16_TOL = 3e-2
SMALL_TOKENS = 16
DEFAULT_TOKENS = 4096
MEMORY_FRACTION = 0.5  # skip a row whose estimated peak memory exceeds this share of the available memory

#: name -> (hidden, ffn, experts, top_k, shared expert width or 0)
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "mixtral": (512, 1024, 8, 2, 0),
    "deepseek": (512, 256, 64, 8, 256),
    "dbrx": (512, 512, 16, 4, 0),
}
SIZE_FIELDS = ("hidden", "ffn", "experts", "top_k", "shared")


@dataclass
class BenchConfig:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    shared: int  # width of the shared expert, 0 for none
    tokens: list[int]  # token counts of the main (forward and forward+backward) rows

    def describe(self) -> str:
        text = f"hidden {self.hidden}, ffn {self.ffn}, E {self.experts}, k {self.top_k}"
        if self.shared:
            text += f" + 1 shared expert (width {self.shared})"
        return text

    @property
    def floor_width(self) -> int:
        return self.top_k * self.ffn + self.shared


@dataclass
class Row:
    impl: str
    tokens: int
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_peak_mib: float | None = None  # CUDA only: peak memory one call adds over what is resident
    fwd_bwd_peak_mib: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- modules
class NaiveLoopMoE(nn.Module):
    """What people write by hand: for each expert, a boolean mask of its tokens and F.linear with W[e].

    Indexing the stacked parameter with W[e] makes autograd build a full [E, ...] gradient per expert.
    """

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.top_k = layer.config.num_experts_per_tok
        self.router_weight = nn.Parameter(layer.router.weight.detach().clone())
        self.gate_up = nn.Parameter(layer.experts.gate_up_proj.detach().clone())
        self.down = nn.Parameter(layer.experts.down_proj.detach().clone())
        self.shared = shared_copy(layer)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(F.linear(x, self.router_weight).float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.gate_up.shape[0]):
            hit = top_i == e  # [T, k]
            rows = hit.any(dim=-1)  # boolean token mask
            if not rows.any():
                continue
            gate, up = F.linear(x[rows], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e])
            weight = (top_w * hit).sum(dim=-1)[rows].to(y.dtype)
            out[rows] += y * weight.unsqueeze(-1)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


def shared_copy(layer: MoELayer) -> DenseSwiGLU | None:
    """The layer's shared expert as a plain dense SwiGLU FFN (the floor's module) with the same weights."""
    if layer.shared_experts is None:
        return None
    source = layer.shared_experts
    shared = DenseSwiGLU(source.up_proj.in_features, source.up_proj.out_features)
    shared.load_state_dict({name: source.state_dict()[name] for name in shared.state_dict()})
    return shared


class WithShared(nn.Module):
    """An MoE block without a shared expert (transformers' Mixtral block, Tutel's layer), plus a dense SwiGLU
    MLP with the shared expert's weights, summed on the same input."""

    def __init__(self, block: nn.Module, shared: nn.Module | None) -> None:
        super().__init__()
        self.block, self.shared = block, shared

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


class MoekitOutput(nn.Module):
    """MoELayer returning only `.hidden_states`."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).hidden_states


# ---------------------------------------------------------------------------------------------- transformers
def load_layer_transformers() -> SimpleNamespace | None:
    """`load_transformers` plus the Mixtral block and Llama MLP the layer rows use, or None when transformers is not
    installed (its rows are skipped then)."""
    try:
        tf = load_transformers()
        from transformers.models.llama.modeling_llama import LlamaMLP
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    tf.LlamaConfig, tf.MixtralConfig = tf.module.LlamaConfig, tf.module.MixtralConfig
    tf.LlamaMLP, tf.MixtralSparseMoeBlock = LlamaMLP, MixtralSparseMoeBlock
    return tf


def build_hf(tf: SimpleNamespace, bc: BenchConfig, layer: MoELayer, impl: str) -> WithShared:
    config = tf.MixtralConfig(hidden_size=bc.hidden, intermediate_size=bc.ffn, num_local_experts=bc.experts,
                              num_experts_per_tok=bc.top_k)
    config._experts_implementation = impl
    block = tf.MixtralSparseMoeBlock(config)
    shared = None
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
        block.experts.down_proj.copy_(layer.experts.down_proj)
        if bc.shared:
            shared = tf.LlamaMLP(tf.LlamaConfig(hidden_size=bc.hidden, intermediate_size=bc.shared,
                                                hidden_act="silu", mlp_bias=False))
            source = layer.shared_experts
            shared.gate_proj.weight.copy_(source.gate_proj.weight)
            shared.up_proj.weight.copy_(source.up_proj.weight)
            shared.down_proj.weight.copy_(source.down_proj.weight)
    return WithShared(block, shared).eval()


# ---------------------------------------------------------------------------------------------- builders
def build_moekit_layer(bc: BenchConfig, backend: str = "auto") -> MoELayer:
    config = MoEConfig(hidden_size=bc.hidden, moe_intermediate_size=bc.ffn, num_local_experts=bc.experts,
                       num_experts_per_tok=bc.top_k, router="topk", n_shared_experts=1 if bc.shared else 0,
                       shared_expert_intermediate_size=bc.shared or None, expert_backend=backend)
    return MoELayer(config).eval()


def moekit_copy(layer: MoELayer, backend: str) -> MoELayer:
    other = MoELayer(layer.config.replace(expert_backend=backend)).eval()
    other.load_state_dict(layer.state_dict())
    return other


# ---------------------------------------------------------------------------------------------- checks
def assert_close(actual: Tensor, expected: Tensor, env: Env, what: str = "") -> None:
    """Equal within fp32 rounding (fp32) or within bf16 rounding relative to the tensor's scale (bf16)."""
    prefix = f"{what}: " if what else ""
    if env.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: prefix + m)
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=BF16_TOL * (scale or 1.0), rtol=BF16_TOL,
                               msg=lambda m: prefix + m)


def assert_same_routing(layer: MoELayer, hf: WithShared, x: Tensor, env: Env) -> None:
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, hf_weights, hf_index = hf.block.gate(flat)
        seq_ids = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        routing = layer.router(flat, seq_ids, 1)
    k = layer.config.num_experts_per_tok
    # Both compute F.linear in the input dtype, then softmax in float32 and top-k: the same kernels on the
    # same values, so the expert choice matches exactly in bf16 too.
    torch.testing.assert_close(routing.expert_index.view(-1, k), hf_index, rtol=0, atol=0)
    assert_close(routing.weights.view(-1, k), hf_weights.float(), env, "routing weights")


def named_grads(module: nn.Module, kind: str) -> dict[str, Tensor | None]:
    """Gradients under common names and moekit's layouts, so every implementation can be compared."""
    if kind == "tutel":
        grads, shared = tutel_grads(module.block), module.shared
    else:
        if kind == "moekit":
            layer = module.layer
            router, gate_up, down = layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj
            shared = layer.shared_experts
        elif kind == "hf":
            block = module.block
            router, gate_up, down = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj
            shared = module.shared
        else:  # naive
            router, gate_up, down, shared = module.router_weight, module.gate_up, module.down, module.shared
        grads = {"router": router.grad, "gate_up": gate_up.grad, "down": down.grad}
    if shared is not None:  # every side's shared expert is a DenseMLP-like gate/up/down
        grads.update(shared_gate=shared.gate_proj.weight.grad, shared_up=shared.up_proj.weight.grad,
                     shared_down=shared.down_proj.weight.grad)
    return grads


def output_and_input_grad(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(output, input gradient) of a forward and `out.backward(grad)`; the parameters' gradients stay on them."""
    module.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    out = module(xg)
    out.backward(grad)
    return out.detach(), xg.grad


def assert_equal_work(reference: nn.Module, candidate: nn.Module, kind: str, x: Tensor, grad: Tensor | None,
                      env: Env) -> None:
    """Same forward output as moekit and, when `grad` is given, same input and weight gradients."""
    with torch.no_grad():
        assert_close(candidate(x), reference(x), env, "output")
    if grad is None:
        return
    ref_out, ref_dx = output_and_input_grad(reference, x, grad)
    out, dx = output_and_input_grad(candidate, x, grad)
    assert_close(out, ref_out, env, "output (autograd)")
    assert_close(dx, ref_dx, env, "input grad")
    ref_grads, grads = named_grads(reference, "moekit"), named_grads(candidate, kind)
    for name, ref_g in ref_grads.items():
        assert_close(grads[name], ref_g, env, f"grad {name}")
    reference.zero_grad(set_to_none=True)
    candidate.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- timing
def forward_timer(row: Row, module: nn.Module, x: Tensor) -> Timer:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return Timer(row, "fwd_ms", run)


def forward_backward_timer(row: Row, module: nn.Module, x: Tensor, grad: Tensor) -> Timer:
    xg = x.detach().clone().requires_grad_(True)

    def zero() -> None:
        module.zero_grad(set_to_none=True)
        xg.grad = None

    def run() -> None:
        module(xg).backward(grad)

    return Timer(row, "fwd_bwd_ms", run, zero)


def estimated_bytes(impl: str, bc: BenchConfig, tokens: int, backward: bool, env: Env) -> int:
    """Rough peak memory of the rows that materialise per-assignment weights (transformers' batched_mm): gathered
    gate_up [2I, H] + down [H, I] per (token, expert) pair, one layer."""
    return gathered_weight_bytes(impl, tokens, bc.top_k, 3 * bc.ffn * bc.hidden, env.dtype, backward=backward)


# ---------------------------------------------------------------------------------------------- running
def run_config(bc: BenchConfig, repeats: int, small: bool, env: Env,
               tf: SimpleNamespace | None) -> tuple[list[Row], list[str]]:
    torch.manual_seed(0)
    notes: list[str] = []

    def put(module: nn.Module) -> nn.Module:
        return module.to(env.device, env.dtype)

    def make_input(tokens: int) -> Tensor:  # drawn on the CPU, so CPU and CUDA runs see the same values
        return torch.randn(1, tokens, bc.hidden).to(env.device, env.dtype)

    layer = put(build_moekit_layer(bc))
    main = [(tokens, make_input(tokens), make_input(tokens)) for tokens in bc.tokens]
    x_small, grad_small = make_input(SMALL_TOKENS), make_input(SMALL_TOKENS)

    reference = MoekitOutput(layer)
    candidates: list[tuple[str, str, str, Callable[[], nn.Module]]] = [("moekit", "moekit", "", lambda: reference)]
    for backend in ("loop", "bmm", "grouped_mm"):  # "moekit" is "auto": one of these, chosen per call
        candidates.append((f"moekit[{backend}]", "moekit", backend,
                           lambda backend=backend: MoekitOutput(put(moekit_copy(layer, backend)))))
    if tf is None:
        notes.append("transformers is not installed: its rows are skipped (pip install transformers to add them)")
    else:
        for impl in tf.implementations:
            label = f"transformers[{impl}]" + (" +shared" if bc.shared else "")
            candidates.append((label, "hf", impl, lambda impl=impl: put(build_hf(tf, bc, layer, impl))))
    tutel = load_tutel()
    if tutel is None:
        notes.append(INSTALL_HINT)
    else:
        candidates.append(("tutel" + (" +shared" if bc.shared else ""), "tutel", "",
                           lambda: put(WithShared(build_tutel(tutel, layer), shared_copy(layer)).eval())))
    candidates.append(("naive loop", "naive", "", lambda: put(NaiveLoopMoE(layer))))
    candidates.append((f"floor (dense {bc.floor_width})", "floor", "",
                       lambda: put(DenseSwiGLU(bc.hidden, bc.floor_width))))

    rows: list[Row] = []
    small_rows: list[Row] = []
    timers: list[Timer] = []
    avail = env.available_bytes()
    for label, kind, impl, make in candidates:
        try:
            module = make()
        except Exception as error:  # an implementation that cannot even be built on this machine
            notes.append(f"{label}: skipped, construction raised {type(error).__name__}: {error}")
            continue
        progress(f"  [{bc.name}] {label} ...")
        passes = [(tokens, x, grad, rows) for tokens, x, grad in main]
        if small and SMALL_TOKENS not in bc.tokens:
            passes.append((SMALL_TOKENS, x_small, grad_small, small_rows))
        for tokens, inputs, grad, out_rows in passes:
            backward = grad is not None
            need = estimated_bytes(impl, bc, tokens, backward, env)
            if avail is not None and need > MEMORY_FRACTION * avail:
                notes.append(f"{label} @ {tokens} tokens: skipped, it gathers one weight copy per (token, expert) "
                             f"pair: ~{estimated_bytes(impl, bc, tokens, False, env) / 2**30:.0f} GiB for the "
                             f"forward alone (~{need / 2**30:.0f} GiB with backward) vs {avail / 2**30:.0f} GiB "
                             "available")
                continue
            try:
                if kind == "hf":
                    assert_same_routing(layer, module, inputs, env)
                if kind != "floor" and module is not reference:
                    assert_equal_work(reference, module, kind, inputs, grad, env)
                row = Row(label, tokens, extra={"small": out_rows is small_rows})
                timers.append(forward_timer(row, module, inputs))
                if backward:
                    timers.append(forward_backward_timer(row, module, inputs, grad))
                    row.extra["saved_mib"] = saved_activation_mib(module, inputs)
                out_rows.append(row)
            except AssertionError:
                raise
            except Exception as error:
                notes.append(f"{label} @ {tokens} tokens: skipped, raised {type(error).__name__}: {first_line(error)}")
                if env.cuda:  # e.g. out of memory: give the cached blocks back before the next row
                    torch.cuda.empty_cache()
    progress(f"  [{bc.name}] timing {len(timers)} measurements in {WARMUP + repeats} interleaved rounds ...")
    run_interleaved(timers, repeats, env.sync)
    measure_peak_memory(timers, env)
    rows.sort(key=lambda row: bc.tokens.index(row.tokens))  # by token count, then in candidate order
    return rows + small_rows, notes


# ---------------------------------------------------------------------------------------------- output
def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ratio(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}x{suffix}"


def add_layer_ratios(rows: list[Row]) -> None:
    """Per row: its time over the floor's and over transformers' eager block's (fwd+bwd, or fwd for the few-token
    rows), tokens/s and its saved activation memory over the floor's."""
    def base(prefix: str, tokens: int) -> Row | None:
        return next((r for r in rows if r.impl.startswith(prefix) and r.tokens == tokens), None)

    for row in rows:
        floor, eager = base("floor", row.tokens), base("transformers[eager]", row.tokens)
        if row.fwd_bwd_ms is not None and not row.extra.get("small"):
            row.extra["ratio_floor"] = row.fwd_bwd_ms / floor.fwd_bwd_ms if floor and floor.fwd_bwd_ms else None
            row.extra["ratio_eager"] = row.fwd_bwd_ms / eager.fwd_bwd_ms if eager and eager.fwd_bwd_ms else None
            row.extra["tokens_per_s"] = row.tokens / (row.fwd_bwd_ms / 1e3)
            row.extra["ratio_basis"] = "fwd+bwd"
        else:  # the few-token rows (decode-like): ratios of forward times
            row.extra["ratio_floor"] = row.fwd_ms / floor.fwd_ms if floor and floor.fwd_ms else None
            row.extra["ratio_eager"] = row.fwd_ms / eager.fwd_ms if eager and eager.fwd_ms else None
            row.extra["tokens_per_s"] = row.tokens / (row.fwd_ms / 1e3) if row.fwd_ms else None
            row.extra["ratio_basis"] = "fwd"
        saved, floor_saved = row.extra.get("saved_mib"), floor.extra.get("saved_mib") if floor else None
        row.extra["saved_ratio_floor"] = saved / floor_saved if saved is not None and floor_saved else None


def print_table(bc: BenchConfig, rows: list[Row], notes: list[str], env: Env, print_fn: Callable = print) -> None:
    headers = ["impl", "tokens", "fwd ms", "fwd+bwd ms", "vs floor (fwd+bwd)", "vs hf eager (fwd+bwd)",
               "tokens/s (fwd+bwd)", "saved MiB (vs floor)"]
    if env.cuda:
        headers.append("peak MiB (fwd+bwd)")
    table = []
    for row in rows:
        fwd_only = row.extra["ratio_basis"] == "fwd"
        suffix = " (fwd)" if fwd_only else ""
        tps = row.extra["tokens_per_s"]
        cells = [row.impl, str(row.tokens), fmt_ms(row.fwd_ms), fmt_ms(row.fwd_bwd_ms),
                 fmt_ratio(row.extra["ratio_floor"], suffix), fmt_ratio(row.extra["ratio_eager"], suffix),
                 "-" if tps is None else f"{tps:,.0f}{suffix}"]
        saved, saved_ratio = row.extra.get("saved_mib"), row.extra.get("saved_ratio_floor")
        ratio = "" if saved_ratio is None else f" ({saved_ratio:.2f}x)"
        cells.append("-" if saved is None else f"{saved:,.1f}{ratio}")
        if env.cuda:
            peak = row.fwd_peak_mib if fwd_only else row.fwd_bwd_peak_mib
            cells.append("-" if peak is None else f"{peak:,.1f}{suffix}")
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    tokens = "/".join(str(t) for t in bc.tokens)
    print_fn(f"\nConfig ({bc.name}): {bc.describe()}, {tokens} tokens")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print_fn(line)
    print_fn("-" * len(line))
    for r in table:
        print_fn("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for note in notes:
        print_fn(f"  note: {note}")


def _tutel_version() -> str:
    if load_tutel() is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tutel")
    except PackageNotFoundError:
        return "installed (version unknown)"


# ---------------------------------------------------------------------------------------------- entry points
def resolve_configs(names: list[str] | None) -> list[str]:
    """Config names from `CONFIGS` (all when None); ValueError for an unknown one."""
    if names is None:
        return list(CONFIGS)
    resolved = []
    for name in names:
        key = name.strip()
        if key not in CONFIGS:
            raise ValueError(f"unknown layer benchmark config {name!r}; choose from {', '.join(CONFIGS)}")
        resolved.append(key)
    return resolved


def run_layer_benchmark(configs: list[str] | None = None, tokens: list[int] | None = None, device: str = "cpu",
                        threads: int = 2, repeats: int = 5, quick: bool = False, json_path: str | None = None,
                        print_fn: Callable[..., Any] = print, small: bool = True,
                        sizes: dict[str, int] | None = None) -> dict:
    """Run the layer benchmark, print its tables through `print_fn` and return every result as a dict.

    configs: names from `CONFIGS` (default all).
    tokens: token counts of the forward and forward+backward rows (default [4096]); with `small`,
    forward-only rows at 16 tokens are added. quick: at most 2 timed repeats. json_path: also write the
    returned dict there. sizes: override the configs' hidden/ffn/experts/top_k/shared (for tests: tiny
    shapes). The input is seeded and the caller's RNG state and thread count are restored afterwards.
    """
    names = resolve_configs(configs)
    env = bench_env(device)
    tokens = list(tokens) if tokens is not None else [DEFAULT_TOKENS]
    if not tokens or any(t < 1 for t in tokens):
        raise ValueError(f"tokens must be a non-empty list of positive counts, got {tokens}")
    unknown = set(sizes or {}) - set(SIZE_FIELDS)
    if unknown:
        raise ValueError(f"sizes accepts {', '.join(SIZE_FIELDS)}; got {', '.join(sorted(unknown))}")
    repeats = resolve_repeats(repeats, quick)

    with bench_context(threads, env):
        return _run(names, tokens, env, threads, repeats, small, sizes or {}, json_path, print_fn)


def _run(names: list[str], tokens: list[int], env: Env, threads: int, repeats: int, small: bool,
         sizes: dict[str, int], json_path: str | None, print_fn: Callable[..., Any]) -> dict:
    torch.manual_seed(0)
    tf = load_layer_transformers()
    info = machine_info(threads, env, tf)
    info["tutel"] = _tutel_version()
    precision = "fp32, CPU" if not env.cuda else "bf16, CUDA"
    print_fn(f"MoE layer benchmark ({precision})")
    for key, value in info.items():
        print_fn(f"  {key}: {value}")
    if env.dtype == torch.float32:
        equality = f"atol=rtol={ATOL:g}"
    else:
        equality = f"rtol={BF16_TOL:g}, atol={BF16_TOL:g} x the reference's largest magnitude (bf16 rounding)"
    print_fn(f"  warmup {WARMUP}, median of {repeats} interleaved rounds; equality checked at {equality}")
    print_fn("  fwd = forward under torch.no_grad(); fwd+bwd = forward + out.backward(grad), fixed random grad,")
    print_fn("  input requires grad; ratios = row time / baseline time (>1 is slower); floor = dense SwiGLU FFN")
    print_fn("  of width k*ffn (+ shared width): same active expert FLOPs, no router/dispatch/combine.")
    print_fn("  saved MiB = activation memory of fwd+bwd: tensors autograd keeps for backward (weights excluded).")
    if small:
        print_fn(f"  Rows with {SMALL_TOKENS} tokens (decode-like): ratios and tokens/s use forward times.")
    if env.cuda:
        print_fn("  Every timed call is wrapped in torch.cuda.synchronize(); peak MiB = torch.cuda.max_memory_allocated"
                 " of one call")
        print_fn("  (counter reset before it) minus the memory allocated just before it: what the call adds.")
    if tf is None:
        print_fn("  note: transformers is not installed: its rows are skipped; moekit, naive loop and floor still run")
    label, info["calibration_start_gflops"] = calibrate_gflops(env)
    info["load_average_start"] = load_average()
    print_fn(f"  calibration at start: {label} {info['calibration_start_gflops']:.0f} GFLOP/s, "
             f"load average {info['load_average_start']}")

    results = []
    for name in names:
        values = dict(zip(SIZE_FIELDS, CONFIGS[name], strict=True))
        values.update(sizes)
        bc = BenchConfig(name, tokens=tokens, **values)
        rows, notes = run_config(bc, repeats, small, env, tf)
        if bc.shared and tf is not None:
            notes.insert(0, "transformers' MixtralSparseMoeBlock has no shared expert: its rows add an HF dense "
                            f"SwiGLU MLP (LlamaMLP, width {bc.shared}) on the same input, summed, with moekit's "
                            "shared-expert weights")
        add_layer_ratios(rows)
        print_table(bc, rows, notes, env, print_fn)
        results.append({"config": asdict(bc), "notes": notes,
                        "rows": [{"impl": r.impl, "tokens": r.tokens, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                                  "fwd_peak_mib": r.fwd_peak_mib, "fwd_bwd_peak_mib": r.fwd_bwd_peak_mib, **r.extra}
                                 for r in rows]})
    _, info["calibration_end_gflops"] = calibrate_gflops(env)
    info["load_average_end"] = load_average()
    print_fn(f"\ncalibration at end: {info['calibration_end_gflops']:.0f} GFLOP/s (start "
             f"{info['calibration_start_gflops']:.0f}), load average {info['load_average_end']}; "
             "a large drop means the timings above were disturbed")
    output = {"machine": info, "device": env.device.type, "dtype": str(env.dtype).removeprefix("torch."),
              "repeats": repeats, "warmup": WARMUP, "results": results}
    if json_path:
        write_json(Path(json_path), output, what="benchmark results")
        print_fn(f"\nwrote {json_path}")
    return output
