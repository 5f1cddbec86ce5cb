"""The expert FFNs of one MoE layer as a single autograd function with a hand-written backward.

`grouped_ffn(x, row_index, group_sizes, w_in, w_out, scale, gated)` computes, for every grouped row n
(rows of expert e are the e-th contiguous slice of `group_sizes[e]` rows):

    x_n = x[row_index[n]]
    a_n = act(x_n @ w_in[e].T) * scale[n]        act = silu(gate) * up (gated) or gelu
    out_n = a_n @ w_out[e].T

Plain autograd through the same loop would keep, per row, the gathered input (H floats), the
projection (2I), the activation (I) and the scaled activation (I), and would build each weight
gradient as E separate tensors stacked at the end. This function saves only the projection `h` and
recomputes the gather and the activation in backward (cheap elementwise work next to the matmuls),
and writes every expert's weight gradient straight into one [E, ...] buffer. The combine weights
`scale` are applied to the [N, I] activation, where their gradient needs no extra saved tensor
(scale * (a @ W.T) = (scale * a) @ W.T).

Two functions compute this with the same saved tensors: `_GroupedFFN` walks the experts in Python and
finishes each expert's work before the next (best for large groups), `_GroupedMMFFN` makes every
matmul one `grouped_mm` call and the elementwise work one pass over all rows (best for small groups,
where the per-expert Python costs more than the matmuls). `grouped_ffn(..., matmul=...)` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: groups of at most this many rows multiply with the weight as the left operand (few tokens: decoding)
WEIGHT_LEFT_MAX_ROWS = 8
#: an expert's projection weight of at least this many bytes is streamed from memory in the few-row orientation
#: for both projections, single rows doubled (see `_weight_left_mm`); smaller weights sit in cache, where the
#: extra copies cost more than they save
STREAM_WEIGHT_MIN_BYTES = 1 << 19


def streams_weights(weights: Tensor) -> bool:
    """True when one expert's slice of the stacked `weights` is large enough to stream (`STREAM_WEIGHT_MIN_BYTES`)."""
    return weights.numel() // max(weights.shape[0], 1) * weights.element_size() >= STREAM_WEIGHT_MIN_BYTES


def activate(h: Tensor, gated: bool) -> Tensor:
    """act(h) without the scale: silu(gate) * up for [N, 2I] (gate columns first), else gelu."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _weight_left_mm(weight: Tensor, rows: Tensor) -> Tensor:
    """rows @ weight.T for a few rows, computed as (weight @ rows.T).T; returns a row-major [n, out].

    With the weight as the left operand MKL streams it instead of packing it. Its fast path needs the right
    operand as a transposed view of row-major rows and at least two columns: a single row is doubled (one
    matrix-vector product is ~1.7x slower than two columns on 2 cores). The result is made row-major so the
    next projection gets its input as row-major rows again.
    """
    n = rows.shape[0]
    rows = rows.contiguous() if n > 1 else rows.expand(2, -1).contiguous()
    return torch.mm(weight, rows.t())[:, :n].t().contiguous()


def expert_slices(group_sizes: list[int]):
    """(expert, start, end) for every expert that has rows (rows grouped expert-major)."""
    start = 0
    for expert, size in enumerate(group_sizes):
        if size > 0:
            yield expert, start, start + size
        start += size


#: the dtypes torch's `grouped_mm` takes (float64 layers use the other backends)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> bool:
    """True when torch's `grouped_mm` accepts this dtype and these widths: every row stride a multiple of 16 bytes."""
    itemsize = dtype.itemsize
    return (hasattr(F, "grouped_mm") and dtype in GROUPED_MM_DTYPES and (hidden_size * itemsize) % 16 == 0
            and (intermediate_size * itemsize) % 16 == 0)


def check_grouped_mm(hidden_size: int, intermediate_size: int, dtype: torch.dtype, what: str, fix: str) -> None:
    """Raise a ValueError naming `fix` when `grouped_mm_fits` is False for these widths."""
    if not hasattr(F, "grouped_mm"):
        raise ValueError(f"{what} needs torch.nn.functional.grouped_mm, which this torch lacks; use {fix} or "
                         "upgrade torch")
    if dtype not in GROUPED_MM_DTYPES:
        raise ValueError(f"{what}: torch's grouped_mm takes float32, bfloat16 or float16, not {dtype}; use {fix}")
    if not grouped_mm_fits(hidden_size, intermediate_size, dtype):
        step = 16 // dtype.itemsize
        raise ValueError(f"{what}: torch's grouped_mm needs hidden and intermediate sizes that are multiples of "
                         f"{step} in {dtype} (16-byte rows), got hidden {hidden_size} and intermediate "
                         f"{intermediate_size}; use {fix}")


def weight_grad_buffer(weight: Tensor, group_sizes: list[int],
                       memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """An uninitialised gradient buffer for a stacked [E, ...] weight, zero at the experts without rows.

    `torch.preserve_format` keeps the weight's own layout: a transposed view's gradient is then row-major for the
    parameter behind it (what `moekit.hf`'s experts need)."""
    grad = torch.empty_like(weight, memory_format=memory_format)
    for expert, size in enumerate(group_sizes):
        if size == 0:
            grad[expert].zero_()
    return grad


class _GroupedFFN(torch.autograd.Function):
    # Forward and backward walk the experts one by one and finish all of an expert's work (matmuls and
    # elementwise) before the next: its rows stay in cache, where whole-tensor elementwise passes over
    # [N, I] would stream them from memory again.
    @staticmethod
    def forward(ctx, x: Tensor, row_index: Tensor | None, w_in: Tensor, w_out: Tensor, scale: Tensor | None,
                group_sizes: list[int], gated: bool) -> Tensor:
        rows = x.shape[0] if row_index is None else row_index.numel()
        out = x.new_empty(rows, w_out.shape[1])  # [N, H]
        projections = []  # per busy expert [n_e, 2I] or [n_e, I]: the only activations saved for backward
        stream_in, stream_out = streams_weights(w_in), streams_weights(w_out)
        for e, start, end in expert_slices(group_sizes):
            xe = x[start:end] if row_index is None else x.index_select(0, row_index[start:end])
            # one block per expert: malloc reuses blocks this size, while one [N, 2I] buffer would be
            # fresh pages (page faults) every call
            few = end - start <= WEIGHT_LEFT_MAX_ROWS
            if few and stream_in:
                he = _weight_left_mm(w_in[e], xe)
            elif few:  # a cache-resident weight: the weight-left product without the copies
                he = torch.mm(w_in[e], xe.t()).t()
            else:
                he = torch.mm(xe, w_in[e].t())
            projections.append(he)
            a = activate(he, gated)
            if scale is not None:
                a.mul_(scale[start:end].unsqueeze(-1))
            if few and stream_out:
                out[start:end] = _weight_left_mm(w_out[e], a)
            else:
                torch.mm(a, w_out[e].t(), out=out[start:end])
        ctx.save_for_backward(x, row_index, w_in, w_out, scale, *projections)
        ctx.group_sizes, ctx.gated = group_sizes, gated
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, row_index, w_in, w_out, scale, *projections = ctx.saved_tensors
        group_sizes, gated = ctx.group_sizes, ctx.gated
        need_x, _, need_w_in, need_w_out, need_scale = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        inner = w_out.shape[2]
        # the rows' input gradients go to one grouped [N, H] buffer, summed into token rows by one
        # index_add_ at the end (one per expert costs ~10x more in total at small widths)
        grad_xg = None if not need_x else (torch.empty(grad_out.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
                                           if row_index is not None else torch.zeros_like(x))
        # every busy expert's slice is overwritten by an out= matmul: only idle experts need zeros
        grad_w_in = weight_grad_buffer(w_in, group_sizes) if need_w_in else None
        grad_w_out = weight_grad_buffer(w_out, group_sizes) if need_w_out else None
        grad_scale = torch.zeros_like(scale) if scale is not None and need_scale else None
        for (e, start, end), he in zip(expert_slices(group_sizes), projections, strict=True):
            go = grad_out[start:end]
            se = scale[start:end].unsqueeze(-1) if scale is not None else None
            if gated:
                gate, up = he.chunk(2, dim=-1)
                silu_gate = F.silu(gate)
                a0 = silu_gate * up  # the unscaled activation, recomputed
            else:
                a0 = F.gelu(he)
            grad_a = torch.mm(go, w_out[e])  # [n, I]
            if need_w_out:
                torch.mm(go.t(), a0 * se if se is not None else a0, out=grad_w_out[e])
            if se is not None:
                if grad_scale is not None:
                    grad_scale[start:end] = (grad_a * a0).sum(-1)
                grad_a.mul_(se)
            del a0
            if gated:  # d(silu(g) * u) = u * silu'(g) dg + silu(g) du
                grad_h = he.new_empty(he.shape)
                torch.ops.aten.silu_backward.grad_input(grad_a * up, gate, grad_input=grad_h[:, :inner])
                torch.mul(grad_a, silu_gate, out=grad_h[:, inner:])
            else:
                grad_h = torch.ops.aten.gelu_backward(grad_a, he)
            if need_w_in:
                xe = x[start:end] if row_index is None else x.index_select(0, row_index[start:end])
                torch.mm(grad_h.t(), xe, out=grad_w_in[e])
            if need_x:
                torch.mm(grad_h, w_in[e], out=grad_xg[start:end])
        grad_x = grad_xg
        if need_x and row_index is not None:
            grad_x = torch.zeros_like(x).index_add_(0, row_index, grad_xg)
        return grad_x, None, grad_w_in, grad_w_out, grad_scale, None, None


class _GroupedMMFFN(torch.autograd.Function):
    # The same function and the same saved tensors as `_GroupedFFN`, with every matmul one `grouped_mm` call
    # (torch walks the groups in C++) and the elementwise work done once over all rows. With small groups
    # (fine-grained experts, short batches) the per-expert Python of the loop costs more than the matmuls.
    @staticmethod
    def forward(ctx, x: Tensor, row_index: Tensor | None, w_in: Tensor, w_out: Tensor, scale: Tensor | None,
                group_sizes: list[int], gated: bool) -> Tensor:
        offsets = torch.tensor(group_sizes, device=x.device).cumsum(0).to(torch.int32)
        xg = x if row_index is None else x.index_select(0, row_index)
        h = F.grouped_mm(xg, w_in.transpose(-2, -1), offs=offsets)  # [N, 2I] or [N, I]
        a = activate(h, gated)
        if scale is not None:
            a.mul_(scale.unsqueeze(-1))
        out = F.grouped_mm(a, w_out.transpose(-2, -1), offs=offsets)
        ctx.save_for_backward(x, row_index, w_in, w_out, scale, offsets, h)
        ctx.gated = gated
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, row_index, w_in, w_out, scale, offsets, h = ctx.saved_tensors
        need_x, _, need_w_in, need_w_out, need_scale = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()  # grouped_mm rejects the stride-0 gradient of a plain .sum()
        inner = w_out.shape[2]
        grad_a = F.grouped_mm(grad_out, w_out, offs=offsets)  # [N, I]
        if ctx.gated:
            gate, up = h.chunk(2, dim=-1)
            silu_gate = F.silu(gate)
            a0 = silu_gate * up  # the unscaled activation, recomputed
        else:
            a0 = F.gelu(h)
        se = scale.unsqueeze(-1) if scale is not None else None
        grad_w_out = F.grouped_mm(grad_out.t(), a0 * se if se is not None else a0, offs=offsets) if need_w_out else None
        grad_scale = None
        if se is not None:
            if need_scale:
                grad_scale = (grad_a * a0).sum(-1)
            grad_a.mul_(se)
        del a0
        if ctx.gated:
            grad_h = torch.empty_like(h)
            torch.ops.aten.silu_backward.grad_input(grad_a * up, gate, grad_input=grad_h[:, :inner])
            torch.mul(grad_a, silu_gate, out=grad_h[:, inner:])
        else:
            grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        grad_w_in = None
        if need_w_in:
            xg = x if row_index is None else x.index_select(0, row_index)
            grad_w_in = F.grouped_mm(grad_h.t(), xg, offs=offsets)
        grad_x = None
        if need_x:
            grad_x = F.grouped_mm(grad_h, w_in, offs=offsets)
            if row_index is not None:
                grad_x = torch.zeros_like(x).index_add_(0, row_index, grad_x)
        return grad_x, None, grad_w_in, grad_w_out, grad_scale, None, None


def grouped_ffn(x: Tensor, row_index: Tensor | None, group_sizes: list[int], w_in: Tensor, w_out: Tensor,
                scale: Tensor | None = None, gated: bool = True, matmul: str = "loop") -> Tensor:
    """Expert FFNs on the rows `x[row_index]`, grouped by expert; returns [N, H] in the same order.

    Args:
        x: [T, H] token rows (each may be read by several grouped rows).
        row_index: [N] int64, the token row of each grouped row, expert-major; None when `x` itself
            is already grouped (then N = T).
        group_sizes: rows per expert, length E, summing to N.
        w_in: [E, 2I, H] (gated: gate rows, then up rows) or [E, I, H].
        w_out: [E, H, I].
        scale: optional [N] per-row factor (the combine weights), applied to the activation.
        gated: SwiGLU (`silu(gate) * up`) when True, GELU otherwise.
        matmul: "loop" runs the experts one by one (each expert's rows stay in cache: best for large groups);
            "grouped_mm" makes every projection one `torch.nn.functional.grouped_mm` call and the elementwise
            work one pass over all rows (best for small groups). Both save the same tensors for backward.

    Under autocast the inputs are cast to the autocast dtype first (as autocast casts a matmul's inputs),
    so the result has that dtype.
    """
    if matmul not in ("loop", "grouped_mm"):
        raise ValueError(f"grouped_ffn: matmul must be 'loop' or 'grouped_mm', got {matmul!r}")
    rows = x.shape[0] if row_index is None else row_index.numel()
    # grouped_mm refuses empty operands; with no rows the loop does nothing (and keeps the graph)
    function = _GroupedMMFFN if matmul == "grouped_mm" and rows > 0 else _GroupedFFN
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    if matmul == "grouped_mm":
        check_grouped_mm(x.shape[1], w_out.shape[2], dtype, "grouped_ffn: matmul='grouped_mm'", "matmul='loop'")
    if autocast:  # the function's out= matmuls need one dtype: autocast's
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        scale = scale.to(dtype) if scale is not None else None
        with torch.autocast(device_type, enabled=False):
            return function.apply(x, row_index, w_in, w_out, scale, group_sizes, gated)
    return function.apply(x, row_index, w_in, w_out, scale, group_sizes, gated)
