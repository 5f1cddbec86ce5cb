"""Benchmark one sparse MoE layer on CPU: moekit vs transformers' Mixtral block vs a dense floor.

For each config it times, on the same input and (for the MoE rows) the same weights and routing:

* ``moekit``: ``MoELayer`` with its default expert backend (on CPU fp32 that is the per-expert loop),
  and the same layer with ``expert_backend="grouped_mm"`` as an extra row;
* ``transformers[<impl>]``: ``MixtralSparseMoeBlock`` with every experts implementation registered in
  ``transformers.integrations.moe`` ("eager" plus the registered ones); those that raise on CPU fp32
  are skipped with a note, and so is any whose estimated memory would not fit in this machine;
* ``floor``: a dense SwiGLU FFN with the same active width (k * ffn, plus the shared expert's width),
  i.e. the same active expert FLOPs without routing, dispatch or combine;
* ``naive loop``: the hand-written pattern "for each expert, boolean-mask its tokens, F.linear with W[e]".

Before timing, every MoE row is checked against moekit (outputs and gradients, atol = rtol = 1e-4),
so all rows do the same work. "fwd" is an inference forward under ``torch.no_grad()``; "fwd+bwd"
is a forward with autograd followed by ``out.backward(grad)`` with a fixed random ``grad`` (the input
requires grad too, as inside a model).

Usage::

    python benchmarks/bench_layer.py                  # full run, threads=2, 5 repeats
    python benchmarks/bench_layer.py --quick          # fewer repeats
    python benchmarks/bench_layer.py --json out.json  # also write every result as JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import LlamaConfig, MixtralConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moekit import MoEConfig, MoELayer

ATOL = RTOL = 1e-4
WARMUP = 2
SMALL_TOKENS = 16
MEMORY_FRACTION = 0.5  # skip a row whose estimated peak memory exceeds this share of the available RAM


@dataclass
class BenchConfig:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    shared: int  # width of the shared expert, 0 for none
    tokens: int

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
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- modules
class DenseSwiGLU(nn.Module):
    """The compute floor: down(silu(gate(x)) * up(x)), no bias."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


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
        self.shared = None
        if layer.shared_experts is not None:
            source = layer.shared_experts
            self.shared = DenseSwiGLU(source.up_proj.in_features, source.up_proj.out_features)
            with torch.no_grad():
                self.shared.gate.weight.copy_(source.gate_proj.weight)
                self.shared.up.weight.copy_(source.up_proj.weight)
                self.shared.down.weight.copy_(source.down_proj.weight)

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


class HFWithShared(nn.Module):
    """transformers' Mixtral block, plus an HF dense SwiGLU MLP (LlamaMLP) standing in for the shared expert."""

    def __init__(self, block: MixtralSparseMoeBlock, shared: nn.Module | None) -> None:
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


# ---------------------------------------------------------------------------------------------- builders
def build_moekit(bc: BenchConfig) -> MoELayer:
    config = MoEConfig(hidden_size=bc.hidden, moe_intermediate_size=bc.ffn, num_local_experts=bc.experts,
                       num_experts_per_tok=bc.top_k, router="topk", n_shared_experts=1 if bc.shared else 0,
                       shared_expert_intermediate_size=bc.shared or None)
    return MoELayer(config).eval()


def moekit_copy(layer: MoELayer, backend: str) -> MoELayer:
    other = MoELayer(layer.config.replace(expert_backend=backend)).eval()
    other.load_state_dict(layer.state_dict())
    return other


def build_hf(bc: BenchConfig, layer: MoELayer, impl: str) -> HFWithShared:
    config = MixtralConfig(hidden_size=bc.hidden, intermediate_size=bc.ffn, num_local_experts=bc.experts,
                           num_experts_per_tok=bc.top_k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    shared = None
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
        block.experts.down_proj.copy_(layer.experts.down_proj)
        if bc.shared:
            shared = LlamaMLP(LlamaConfig(hidden_size=bc.hidden, intermediate_size=bc.shared, hidden_act="silu",
                                          mlp_bias=False))
            source = layer.shared_experts
            shared.gate_proj.weight.copy_(source.gate_proj.weight)
            shared.up_proj.weight.copy_(source.up_proj.weight)
            shared.down_proj.weight.copy_(source.down_proj.weight)
    return HFWithShared(block, shared).eval()


def hf_implementations() -> list[str]:
    return ["eager", *[name for name in ALL_EXPERTS_FUNCTIONS if name != "eager"]]


# ---------------------------------------------------------------------------------------------- checks
def assert_same_routing(layer: MoELayer, hf: HFWithShared, x: Tensor) -> None:
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, hf_weights, hf_index = hf.block.gate(flat)
        seq_ids = torch.zeros(flat.shape[0], dtype=torch.long)
        routing = layer.router(flat, seq_ids, 1)
    k = layer.config.num_experts_per_tok
    torch.testing.assert_close(routing.expert_index.view(-1, k), hf_index, rtol=0, atol=0)
    torch.testing.assert_close(routing.weights.view(-1, k), hf_weights.float(), atol=ATOL, rtol=RTOL)


def named_grads(module: nn.Module, kind: str) -> dict[str, Tensor]:
    """Gradients under common names, so moekit, transformers and the naive loop can be compared."""
    if kind == "moekit":
        layer = module.layer
        grads = {"router": layer.router.weight.grad, "gate_up": layer.experts.gate_up_proj.grad,
                 "down": layer.experts.down_proj.grad}
        if layer.shared_experts is not None:
            s = layer.shared_experts
            grads.update(shared_gate=s.gate_proj.weight.grad, shared_up=s.up_proj.weight.grad,
                         shared_down=s.down_proj.weight.grad)
    elif kind == "hf":
        block = module.block
        grads = {"router": block.gate.weight.grad, "gate_up": block.experts.gate_up_proj.grad,
                 "down": block.experts.down_proj.grad}
        if module.shared is not None:
            s = module.shared
            grads.update(shared_gate=s.gate_proj.weight.grad, shared_up=s.up_proj.weight.grad,
                         shared_down=s.down_proj.weight.grad)
    else:  # naive
        grads = {"router": module.router_weight.grad, "gate_up": module.gate_up.grad, "down": module.down.grad}
        if module.shared is not None:
            s = module.shared
            grads.update(shared_gate=s.gate.weight.grad, shared_up=s.up.weight.grad, shared_down=s.down.weight.grad)
    return grads


def forward_backward(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    module.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    out = module(xg)
    out.backward(grad)
    return out.detach(), xg.grad


def assert_equal_work(reference: nn.Module, candidate: nn.Module, kind: str, x: Tensor, grad: Tensor | None) -> None:
    """Same forward output as moekit and, when `grad` is given, same input and weight gradients."""
    with torch.no_grad():
        torch.testing.assert_close(candidate(x), reference(x), atol=ATOL, rtol=RTOL)
    if grad is None:
        return
    ref_out, ref_dx = forward_backward(reference, x, grad)
    out, dx = forward_backward(candidate, x, grad)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dx, ref_dx, atol=ATOL, rtol=RTOL)
    ref_grads, grads = named_grads(reference, "moekit"), named_grads(candidate, kind)
    for name, ref_g in ref_grads.items():
        torch.testing.assert_close(grads[name], ref_g, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"grad {n}: {m}")
    reference.zero_grad(set_to_none=True)
    candidate.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for i in range(WARMUP + repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= WARMUP:
            times.append(elapsed)
    return statistics.median(times) * 1e3


@dataclass
class Timer:
    """One thing to time: `run` (after `before`), whose median lands in `row.<attribute>`."""

    row: Row
    attribute: str
    run: Callable[[], object]
    before: Callable[[], None] | None = None


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


def run_interleaved(timers: list[Timer], repeats: int) -> None:
    """Time every timer once per round, round after round, and keep each one's median.

    Interleaving spreads the machine's slow and fast moments over all rows alike, so the ratios
    measured in one run stay meaningful on a noisy shared machine.
    """
    samples: list[list[float]] = [[] for _ in timers]
    for round_index in range(WARMUP + repeats):
        for timer, times in zip(timers, samples, strict=True):
            if timer.before is not None:
                timer.before()
            start = time.perf_counter()
            timer.run()
            elapsed = time.perf_counter() - start
            if round_index >= WARMUP:
                times.append(elapsed)
    for timer, times in zip(timers, samples, strict=True):
        setattr(timer.row, timer.attribute, statistics.median(times) * 1e3)
        if timer.before is not None:
            timer.before()


def calibrate_gflops() -> float:
    """fp32 matmul throughput right now (a noise indicator: compare the value at the start and the end)."""
    a, b = torch.randn(2048, 512), torch.randn(512, 2048)
    ms = median_ms(lambda: a @ b, 5)
    return 2 * 2048 * 512 * 2048 / (ms / 1e3) / 1e9


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_bytes(impl: str, bc: BenchConfig, tokens: int, backward: bool) -> int:
    """Rough peak memory of the rows that materialise per-assignment weights (transformers' batched_mm)."""
    if impl != "batched_mm":
        return 0
    per_pair = 3 * bc.ffn * bc.hidden * 4  # gathered gate_up [2I, H] + down [H, I], fp32
    return tokens * bc.top_k * per_pair * (3 if backward else 1)


# ---------------------------------------------------------------------------------------------- running
def run_config(bc: BenchConfig, repeats: int, small: bool) -> tuple[list[Row], list[str]]:
    torch.manual_seed(0)
    notes: list[str] = []
    layer = build_moekit(bc)
    x = torch.randn(1, bc.tokens, bc.hidden)
    grad = torch.randn(1, bc.tokens, bc.hidden)
    x_small = torch.randn(1, SMALL_TOKENS, bc.hidden)

    reference = MoekitOutput(layer)
    candidates: list[tuple[str, str, str, Callable[[], nn.Module]]] = [
        ("moekit", "moekit", "", lambda: reference),
        ("moekit (grouped_mm)", "moekit", "grouped_mm", lambda: MoekitOutput(moekit_copy(layer, "grouped_mm"))),
    ]
    for impl in hf_implementations():
        label = f"transformers[{impl}]" + (" +shared" if bc.shared else "")
        candidates.append((label, "hf", impl, lambda impl=impl: build_hf(bc, layer, impl)))
    candidates.append(("naive loop", "naive", "", lambda: NaiveLoopMoE(layer)))
    candidates.append((f"floor (dense {bc.floor_width})", "floor", "", lambda: DenseSwiGLU(bc.hidden, bc.floor_width)))

    rows: list[Row] = []
    small_rows: list[Row] = []
    timers: list[Timer] = []
    avail = available_bytes()
    for label, kind, impl, make in candidates:
        try:
            module = make()
        except Exception as error:  # an implementation that cannot even be built on this machine
            notes.append(f"{label}: skipped, construction raised {type(error).__name__}: {error}")
            continue
        print(f"  [{bc.name}] {label} ...", file=sys.stderr, flush=True)
        passes = [(bc.tokens, x, True, rows)]
        if small:
            passes.append((SMALL_TOKENS, x_small, False, small_rows))
        for tokens, inputs, backward, out_rows in passes:
            need = estimated_bytes(impl, bc, tokens, backward)
            if avail is not None and need > MEMORY_FRACTION * avail:
                notes.append(f"{label} @ {tokens} tokens: skipped, it gathers one weight copy per (token, expert) "
                             f"pair: ~{estimated_bytes(impl, bc, tokens, False) / 2**30:.0f} GiB for the forward "
                             f"alone (~{need / 2**30:.0f} GiB with backward) vs {avail / 2**30:.0f} GiB available")
                continue
            try:
                if kind == "hf":
                    assert_same_routing(layer, module, inputs)
                if kind != "floor" and module is not reference:
                    assert_equal_work(reference, module, kind, inputs, grad if backward else None)
                row = Row(label, tokens)
                timers.append(forward_timer(row, module, inputs))
                if backward:
                    timers.append(forward_backward_timer(row, module, inputs, grad))
                out_rows.append(row)
            except AssertionError:
                raise
            except Exception as error:
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                notes.append(f"{label} @ {tokens} tokens: skipped, raised {type(error).__name__}: {first_line[:160]}")
    print(f"  [{bc.name}] timing {len(timers)} measurements in {WARMUP + repeats} interleaved rounds ...",
          file=sys.stderr, flush=True)
    run_interleaved(timers, repeats)
    return rows + small_rows, notes


# ---------------------------------------------------------------------------------------------- output
def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ratio(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}x{suffix}"


def add_ratios(rows: list[Row]) -> None:
    def base(prefix: str, tokens: int) -> Row | None:
        return next((r for r in rows if r.impl.startswith(prefix) and r.tokens == tokens), None)

    for row in rows:
        floor, eager = base("floor", row.tokens), base("transformers[eager]", row.tokens)
        if row.fwd_bwd_ms is not None:
            row.extra["ratio_floor"] = row.fwd_bwd_ms / floor.fwd_bwd_ms if floor and floor.fwd_bwd_ms else None
            row.extra["ratio_eager"] = row.fwd_bwd_ms / eager.fwd_bwd_ms if eager and eager.fwd_bwd_ms else None
            row.extra["tokens_per_s"] = row.tokens / (row.fwd_bwd_ms / 1e3)
            row.extra["ratio_basis"] = "fwd+bwd"
        else:  # forward-only rows: ratios of forward times
            row.extra["ratio_floor"] = row.fwd_ms / floor.fwd_ms if floor and floor.fwd_ms else None
            row.extra["ratio_eager"] = row.fwd_ms / eager.fwd_ms if eager and eager.fwd_ms else None
            row.extra["tokens_per_s"] = row.tokens / (row.fwd_ms / 1e3) if row.fwd_ms else None
            row.extra["ratio_basis"] = "fwd"


def print_table(bc: BenchConfig, rows: list[Row], notes: list[str]) -> None:
    headers = ["impl", "tokens", "fwd ms", "fwd+bwd ms", "vs floor (fwd+bwd)", "vs hf eager (fwd+bwd)",
               "tokens/s (fwd+bwd)"]
    table = []
    for row in rows:
        suffix = " (fwd)" if row.extra["ratio_basis"] == "fwd" else ""
        tps = row.extra["tokens_per_s"]
        table.append([row.impl, str(row.tokens), fmt_ms(row.fwd_ms), fmt_ms(row.fwd_bwd_ms),
                      fmt_ratio(row.extra["ratio_floor"], suffix), fmt_ratio(row.extra["ratio_eager"], suffix),
                      "-" if tps is None else f"{tps:,.0f}{suffix}"])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print(f"\nConfig ({bc.name}): {bc.describe()}, {bc.tokens} tokens")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for note in notes:
        print(f"  note: {note}")


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row; the median is shown")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (2), for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch for the main rows")
    parser.add_argument("--configs", default="a,b", help="comma-separated subset of the configs a,b")
    parser.add_argument("--no-small", action="store_true", help=f"skip the {SMALL_TOKENS}-token forward-only rows")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info(args.threads)
    configs = {
        "a": BenchConfig("a", hidden=512, ffn=1024, experts=8, top_k=2, shared=0, tokens=args.tokens),
        "b": BenchConfig("b", hidden=512, ffn=256, experts=64, top_k=8, shared=256, tokens=args.tokens),
    }
    print("MoE layer benchmark (fp32, CPU)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(f"  warmup {WARMUP}, median of {repeats} interleaved rounds; equality checked at atol=rtol={ATOL:g}")
    print("  fwd = forward under torch.no_grad(); fwd+bwd = forward + out.backward(grad), fixed random grad,")
    print("  input requires grad; ratios = row time / baseline time (>1 is slower); floor = dense SwiGLU FFN")
    print("  of width k*ffn (+ shared width): same active expert FLOPs, no router/dispatch/combine.")
    print(f"  Rows with {SMALL_TOKENS} tokens are forward only; their ratios and tokens/s use forward times.")
    info["calibration_start_gflops"] = calibrate_gflops()
    info["load_average_start"] = load_average()
    print(f"  calibration at start: 2048x512x2048 fp32 matmul {info['calibration_start_gflops']:.0f} GFLOP/s, "
          f"load average {info['load_average_start']}")

    results = []
    for key in args.configs.split(","):
        bc = configs[key.strip()]
        rows, notes = run_config(bc, repeats, small=not args.no_small)
        if bc.shared:
            notes.insert(0, "transformers' MixtralSparseMoeBlock has no shared expert: its rows add an HF dense "
                            f"SwiGLU MLP (LlamaMLP, width {bc.shared}) on the same input, summed, with moekit's "
                            "shared-expert weights")
        add_ratios(rows)
        print_table(bc, rows, notes)
        results.append({"config": bc.__dict__, "notes": notes,
                        "rows": [{"impl": r.impl, "tokens": r.tokens, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                                  **r.extra} for r in rows]})
    info["calibration_end_gflops"] = calibrate_gflops()
    info["load_average_end"] = load_average()
    print(f"\ncalibration at end: {info['calibration_end_gflops']:.0f} GFLOP/s (start "
          f"{info['calibration_start_gflops']:.0f}), load average {info['load_average_end']}; "
          "a large drop means the timings above were disturbed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": repeats, "warmup": WARMUP, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
