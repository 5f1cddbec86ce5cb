"""Expert FFNs with stacked weights `[E, ...]`, and the always-on shared experts.

Weight layout follows transformers' fused MoE experts so checkpoints map one to one:
SwiGLU (`hidden_act="silu"`, or GPT-OSS's `"clamped_swiglu"`): `gate_up_proj [E, 2*I, H]` (gate rows first, then
up) and `down_proj [E, H, I]`; GELU: `up_proj [E, I, H]` and `down_proj [E, H, I]`. With `bias=True` (GPT-OSS)
every expert also has `gate_up_proj_bias [E, 2*I]` and `down_proj_bias [E, H]`.

Experts with biases or the clamped activation run a plain autograd loop over the busy experts (`_forward_general`):
correct for every backend setting, without the hand-written backwards' memory savings (which fold the combine
weight into the activation, where a bias would not be scaled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GATED_ACTS, MoEConfig
from .grouped_ffn import activate, check_grouped_mm, grouped_ffn, grouped_mm_fits, streams_weights


@dataclass(frozen=True)
class BackendThreshold:
    """One measured bound of the "auto" expert backend choice.

    Attributes:
        value: the bound (a pair for a range).
        decides: what is chosen on which side of it.
        evidence: the benchmark result (under `benchmarks/results/`) or the recorded sweep that set it.
    """

    value: int | tuple[int, int]
    decides: str
    evidence: str


#: Every measured bound behind `expert_backend="auto"` (CPU; CUDA in bf16/fp16 always runs `grouped_mm`), by name.
#: `choose_backend` and the padded bmm read their values here; docs point here rather than restating them.
AUTO_BACKEND_THRESHOLDS: dict[str, BackendThreshold] = {
    "grouped_mm_cpu_train_row_elements": BackendThreshold(
        65536,
        "training: grouped_mm while the average busy expert's rows x hidden size is at most this, else the loop",
        "the fwd+bwd sweep in commit d8eae36's message (hidden 128-512, 32-512 rows per expert); "
        "benchmarks/results/bench_model.txt (tiny-deepseek's training step)"),
    "loop_max_average_rows": BackendThreshold(
        4,
        "inference: the loop while busy experts average at most this many rows and each expert's weight "
        "streams from memory (decoding), before the padded bmm is considered",
        "benchmarks/results/bench_layer_16.txt (16-token rows; commit 54280ec)"),
    "padded_max_rows": BackendThreshold(
        64,
        "inference: the padded bmm only when no expert has more rows than this",
        "benchmarks/results/bench_layer_16.txt (16-token rows) and bench_layer.txt (4096 tokens: bmm slower)"),
    "padded_weight_left_max_rows": BackendThreshold(
        4,
        "the padded bmm multiplies with the weights as the left operand up to this many rows per expert",
        "benchmarks/results/bench_layer_16.txt (16-token rows; commit 496964e)"),
    "grouped_mm_cpu_rows": BackendThreshold(
        (8, 128),
        "inference: grouped_mm when busy experts average more rows than the first and at most the second "
        "(prefill, eval batches); outside that range the loop",
        "the no-grad sweep in commit f0be1fc's message (hidden 128-512, 256-1024 tokens); "
        "benchmarks/results/bench_decode.txt (prefill)"),
}


def auto_threshold(name: str) -> int | tuple[int, int]:
    """The value of `AUTO_BACKEND_THRESHOLDS[name]`."""
    return AUTO_BACKEND_THRESHOLDS[name].value


def _activation(name: str):
    return F.silu if name == "silu" else F.gelu


def clamped_swiglu(gate: Tensor, up: Tensor, limit: float, alpha: float) -> Tensor:
    """GPT-OSS's gated activation: (clamp(up, -L, L) + 1) * g * sigmoid(alpha g), g = clamp(gate, max=L)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on, else the input's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def builds_graph(x: Tensor, in_proj: Tensor) -> bool:
    """True when this call builds a graph: the input or the expert weights need gradients."""
    return torch.is_grad_enabled() and (x.requires_grad or in_proj.requires_grad)


def choose_backend(requested: str, x: Tensor, group_sizes: list[int], in_proj: Tensor, down_proj: Tensor) -> str:
    """The backend that runs these grouped rows: `requested` unless it is "auto".

    `in_proj` is [E, 2I or I, H] and `down_proj` [E, H, I] (any strides). "auto" picks `grouped_mm` on CUDA in
    bf16/fp16. When gradients are needed on the CPU it picks one of the two hand-written backwards (both keep the
    least memory): `grouped_mm` for small groups (`grouped_mm_cpu_train_row_elements`), else the per-expert `loop`
    (other devices: the loop). For inference it picks the loop for a few rows per busy expert whose weights stream
    from memory (`loop_max_average_rows`); else the padded `bmm` when every group fits a small padded batch
    (`padded_max_rows`) that wastes little; else torch's CPU `grouped_mm` for mid-sized groups
    (`grouped_mm_cpu_rows`); else the loop. The bounds and the measurements behind them are in
    `AUTO_BACKEND_THRESHOLDS`.
    """
    num_experts, hidden_size, intermediate_size = down_proj.shape
    dtype = compute_dtype(x)
    if requested == "grouped_mm":
        check_grouped_mm(hidden_size, intermediate_size, dtype, "expert_backend='grouped_mm'",
                         "expert_backend='auto' or 'loop'")
    if requested != "auto":
        return requested
    fits = grouped_mm_fits(hidden_size, intermediate_size, dtype)
    if x.is_cuda and fits and x.dtype in (torch.bfloat16, torch.float16):
        return "grouped_mm"
    rows, most = sum(group_sizes), max(group_sizes, default=0)
    busy = sum(1 for size in group_sizes if size > 0)
    if builds_graph(x, in_proj):
        # training: both hand-written backwards save the least memory; grouped_mm for small groups
        small = busy and rows * hidden_size <= auto_threshold("grouped_mm_cpu_train_row_elements") * busy
        return "grouped_mm" if fits and small and x.device.type == "cpu" else "loop"
    if rows <= auto_threshold("loop_max_average_rows") * busy and streams_weights(in_proj):
        return "loop"  # a few rows per expert: the loop streams just the busy experts' weights
    if most <= auto_threshold("padded_max_rows") and 2 * busy >= num_experts and num_experts * most <= 8 * rows:
        return "bmm"
    low, high = auto_threshold("grouped_mm_cpu_rows")
    if fits and busy and low * busy < rows <= high * busy:
        return "grouped_mm"
    return "loop"


def stacked_experts(x: Tensor, group_sizes: list[int], in_proj: Tensor, down_proj: Tensor, gated: bool,
                    backend: str = "auto", row_scale: Tensor | None = None, row_index: Tensor | None = None) -> Tensor:
    """SwiGLU (`gated`) or GELU expert FFNs with stacked weights on grouped rows; returns [N, H], grouped order.

    The function behind `GroupedExperts.forward` (experts without biases), with the weights passed in:
    `in_proj` [E, 2I or I, H] and `down_proj` [E, H, I], any strides (transposed views of another layout
    work). `backend` is "auto", "loop", "grouped_mm" or "bmm"; see `choose_backend`. `row_scale` and
    `row_index` are as for `GroupedExperts.forward`.
    """
    rows = x.shape[0] if row_index is None else row_index.numel()
    backend = choose_backend(backend, x, group_sizes, in_proj, down_proj) if rows > 0 else "loop"
    if backend == "loop" or (backend == "grouped_mm" and not x.is_cuda and builds_graph(x, in_proj)):
        # CPU training: hand-written backward (CUDA keeps autograd through grouped_mm, tested there)
        return grouped_ffn(x, row_index, group_sizes, in_proj, down_proj, row_scale, gated, matmul=backend)
    if row_index is not None:
        x = x.index_select(0, row_index)
    hidden_size, intermediate_size = down_proj.shape[1:]
    inner = row_scale is not None and intermediate_size < hidden_size
    inner_scale = row_scale if inner else None
    if backend == "grouped_mm":
        out = _grouped_mm_forward(x, group_sizes, in_proj, down_proj, gated, inner_scale)
    else:
        out = _padded_forward(x, group_sizes, in_proj, down_proj, gated, inner_scale)
    if row_scale is not None and not inner:
        out = out * row_scale.unsqueeze(-1)
    return out


def _scaled_activation(h: Tensor, gated: bool, scale: Tensor | None) -> Tensor:
    h = activate(h, gated)
    return h if scale is None else h * scale.unsqueeze(-1)


def _padded_forward(x: Tensor, group_sizes: list[int], in_proj: Tensor, down_proj: Tensor, gated: bool,
                    scale: Tensor | None) -> Tensor:
    # Expert e's rows go to slots [e, 0..n_e) of a zero-padded [E, C, H] batch: two bmm calls
    # replace the loop; padded slots compute on zeros and are never read back.
    num_experts, capacity, rows = in_proj.shape[0], max(group_sizes), x.shape[0]
    sizes = torch.tensor(group_sizes, device=x.device)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), sizes, output_size=rows)
    first_row = sizes.cumsum(0) - sizes
    slot = expert_of_row * capacity + torch.arange(rows, device=x.device) - first_row[expert_of_row]
    padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, slot, x).view(num_experts, capacity, -1)
    if scale is not None:
        scale = scale.new_zeros(num_experts * capacity).index_copy(0, slot, scale).view(num_experts, capacity)
    if capacity <= auto_threshold("padded_weight_left_max_rows"):
        # h^T = W x^T per expert: MKL streams each weight instead of packing it (see grouped_ffn)
        h = torch.bmm(in_proj, padded.transpose(1, 2)).transpose(1, 2)
        a = _scaled_activation(h, gated, scale).contiguous()  # row-major again, for the same fast path below
        out = torch.bmm(down_proj, a.transpose(1, 2)).transpose(1, 2)
    else:
        h = torch.bmm(padded, in_proj.transpose(1, 2))
        out = torch.bmm(_scaled_activation(h, gated, scale), down_proj.transpose(1, 2))
    return out.reshape(num_experts * capacity, -1).index_select(0, slot)


def _grouped_mm_forward(x: Tensor, group_sizes: list[int], in_proj: Tensor, down_proj: Tensor, gated: bool,
                        scale: Tensor | None) -> Tensor:
    offsets = torch.tensor(group_sizes, device=x.device).cumsum(0).to(torch.int32)
    h = _scaled_activation(F.grouped_mm(x, in_proj.transpose(-2, -1), offs=offsets), gated, scale)
    return F.grouped_mm(h, down_proj.transpose(-2, -1), offs=offsets)


class GroupedExperts(nn.Module):
    """E expert FFNs stored as stacked tensors; run on tokens already grouped by expert.

    `forward(x, group_sizes)` takes `x: [N, H]` sorted so that expert e's rows are the e-th
    contiguous slice of length `group_sizes[e]`, and returns `[N, H]` in the same order.
    Experts never see the router.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 backend: str = "auto", bias: bool = False, swiglu_limit: float | None = None,
                 swiglu_alpha: float | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.hidden_act = hidden_act
        self.gated = hidden_act in GATED_ACTS
        self.backend = backend
        self.bias = bias
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        if hidden_act == "clamped_swiglu" and (swiglu_limit is None or swiglu_alpha is None):
            raise ValueError("GroupedExperts: hidden_act='clamped_swiglu' needs swiglu_limit and swiglu_alpha")
        # biases or GPT-OSS's activation: the plain autograd loop computes these experts
        self.general = bias or hidden_act == "clamped_swiglu"
        in_rows = 2 * intermediate_size if self.gated else intermediate_size
        in_proj = torch.empty(num_experts, in_rows, hidden_size)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if self.gated:
            self.gate_up_proj = nn.Parameter(in_proj)
        else:
            self.up_proj = nn.Parameter(in_proj)
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, in_rows))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: MoEConfig) -> GroupedExperts:
        return cls(config.num_local_experts, config.hidden_size, config.moe_intermediate_size,
                   config.hidden_act, config.expert_backend, config.expert_bias, config.swiglu_limit,
                   config.swiglu_alpha)

    def same_kind(self, num_experts: int, intermediate_size: int | None = None) -> GroupedExperts:
        """New experts of this kind (activation, biases, backend) with another count or width."""
        return GroupedExperts(num_experts, self.hidden_size, intermediate_size or self.intermediate_size,
                              self.hidden_act, self.backend, self.bias, self.swiglu_limit, self.swiglu_alpha)

    def reset_parameters(self) -> None:
        """Each expert initialised like a pair of `nn.Linear` layers (biases zero)."""
        for weight in (self.in_proj, self.down_proj):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
        if self.bias:
            nn.init.zeros_(self.gate_up_proj_bias)
            nn.init.zeros_(self.down_proj_bias)

    @property
    def in_proj(self) -> Tensor:
        """The first projection: `gate_up_proj` (SwiGLU) or `up_proj` (GELU)."""
        return self.gate_up_proj if self.gated else self.up_proj

    def activation(self, h: Tensor) -> Tensor:
        """The experts' activation of a first projection h [..., 2I] (gated) or [..., I]."""
        if self.hidden_act == "clamped_swiglu":
            return clamped_swiglu(*h.chunk(2, dim=-1), self.swiglu_limit, self.swiglu_alpha)
        return activate(h, self.gated)

    def resolve_backend(self, x: Tensor, group_sizes: list[int]) -> str:
        """The backend that runs these rows: `expert_backend`, or for "auto" what `choose_backend` picks."""
        return choose_backend(self.backend, x, group_sizes, self.in_proj, self.down_proj)

    def forward(self, x: Tensor, group_sizes: list[int], row_scale: Tensor | None = None,
                row_index: Tensor | None = None) -> Tensor:
        """Experts on grouped rows; returns [N, H] in the grouped order.

        Args:
            x: [N, H] rows grouped by expert (expert e's rows are the e-th slice of `group_sizes[e]`
                rows), or, with `row_index`, the [T, H] token rows the grouped rows are read from.
            group_sizes: rows per expert, length E.
            row_scale: optional [N] factor per grouped row (the combine weights): the result is
                row_scale * expert(x). The loop backend applies it to the [N, I] activation; the others
                on the [N, I] activation when I < H, else on the [N, H] output.
            row_index: optional [N] token row of each grouped row; the loop backend gathers the rows
                itself (and saves no gathered copy for backward).
        """
        if row_scale is not None:
            row_scale = row_scale.to(x.dtype)
        if self.general:
            return self._forward_general(x, group_sizes, row_scale, row_index)
        return stacked_experts(x, group_sizes, self.in_proj, self.down_proj, self.gated, self.backend, row_scale,
                               row_index)

    def _forward_general(self, x: Tensor, group_sizes: list[int], row_scale: Tensor | None,
                         row_index: Tensor | None) -> Tensor:
        """Plain autograd, one expert at a time: biases and any activation; the weight scales the whole output."""
        if row_index is not None:
            x = x.index_select(0, row_index)
        outs, start = [], 0
        for expert, size in enumerate(group_sizes):
            if size:
                outs.append(self.expert_forward(x[start:start + size], expert))
            start += size
        if outs:
            out = torch.cat(outs)
        else:  # no rows: an empty output that still reaches the weights' graph
            out = x.new_zeros(0, self.hidden_size) + 0.0 * self.down_proj.sum()
        return out if row_scale is None else out * row_scale.unsqueeze(-1)

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """Run one expert on `x: [n, H]` (for references, analysis and the biased experts' loop)."""
        bias_in = self.gate_up_proj_bias[expert] if self.bias else None
        bias_out = self.down_proj_bias[expert] if self.bias else None
        h = F.linear(x, self.in_proj[expert], bias_in)
        return F.linear(self.activation(h), self.down_proj[expert], bias_out)

    @torch.no_grad()
    def segment(self, m: int) -> GroupedExperts:
        """Fine-grained segmentation: split every expert's FFN into m experts of width I/m.

        Expert e becomes experts e*m .. e*m+m-1; summing their outputs gives expert e's output
        exactly (FFN hidden units are independent), so active parameters are unchanged.
        """
        if self.intermediate_size % m != 0:
            raise ValueError(f"segment: intermediate_size={self.intermediate_size} is not divisible by m={m}")
        if self.bias:
            raise ValueError("segment: experts with biases cannot be split exactly (each segment would add the "
                             "down_proj bias again)")
        piece = self.intermediate_size // m
        new = self.same_kind(self.num_experts * m, piece)
        new.to(self.down_proj.device, self.down_proj.dtype)
        if self.gated:
            gate, up = self.gate_up_proj.split(self.intermediate_size, dim=1)
            gate = gate.reshape(self.num_experts * m, piece, self.hidden_size)
            up = up.reshape(self.num_experts * m, piece, self.hidden_size)
            new.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        else:
            new.up_proj.copy_(self.up_proj.reshape(self.num_experts * m, piece, self.hidden_size))
        down = self.down_proj.view(self.num_experts, self.hidden_size, m, piece).permute(0, 2, 1, 3)
        new.down_proj.copy_(down.reshape(self.num_experts * m, self.hidden_size, piece))
        return new

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, hidden_act={self.hidden_act!r}"
                + (", bias=True" if self.bias else ""))


class SharedExperts(nn.Module):
    """Always-active expert(s) fused into one FFN, optionally scaled by a sigmoid gate (Qwen2-MoE).

    Names match transformers' MLPs: `gate_proj`, `up_proj`, `down_proj` (and `gate` for the
    Qwen2-MoE `shared_expert_gate`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 use_gate: bool = False, swiglu_limit: float | None = None, swiglu_alpha: float | None = None) -> None:
        super().__init__()
        self.gated = hidden_act in GATED_ACTS
        self.act = _activation(hidden_act)
        self.clamp = (swiglu_limit, swiglu_alpha) if hidden_act == "clamped_swiglu" else None
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if use_gate else None

    @classmethod
    def from_config(cls, config: MoEConfig) -> SharedExperts:
        return cls(config.hidden_size, config.resolved_shared_intermediate_size, config.hidden_act,
                   config.shared_expert_gate, config.swiglu_limit, config.swiglu_alpha)

    def forward(self, x: Tensor) -> Tensor:
        if self.clamp is not None:
            h = clamped_swiglu(self.gate_proj(x), self.up_proj(x), *self.clamp)
        elif self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        out = self.down_proj(h)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
