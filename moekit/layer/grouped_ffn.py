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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def activate(h: Tensor, gated: bool) -> Tensor:
    """act(h) without the scale: silu(gate) * up for [N, 2I] (gate columns first), else gelu."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _slices(group_sizes: list[int]):
    """(expert, start, end) for every expert that has rows."""
    start = 0
    for expert, size in enumerate(group_sizes):
        if size > 0:
            yield expert, start, start + size
        start += size


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_index: Tensor, w_in: Tensor, w_out: Tensor, scale: Tensor | None,
                group_sizes: list[int], gated: bool) -> Tensor:
        xp = x if row_index is None else x.index_select(0, row_index)  # [N, H]
        rows = xp.shape[0]
        h = x.new_empty(rows, w_in.shape[1])  # [N, 2I] or [N, I]
        for e, start, end in _slices(group_sizes):
            torch.mm(xp[start:end], w_in[e].t(), out=h[start:end])
        a = activate(h, gated)  # [N, I]
        if scale is not None:
            a.mul_(scale.unsqueeze(-1))
        out = x.new_empty(rows, w_out.shape[1])  # [N, H]
        for e, start, end in _slices(group_sizes):
            torch.mm(a[start:end], w_out[e].t(), out=out[start:end])
        ctx.save_for_backward(x, row_index, w_in, w_out, scale, h)
        ctx.group_sizes, ctx.gated = group_sizes, gated
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, row_index, w_in, w_out, scale, h = ctx.saved_tensors
        group_sizes, gated = ctx.group_sizes, ctx.gated
        need_x, _, need_w_in, need_w_out, need_scale = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        rows, inner = h.shape[0], w_out.shape[2]

        a0 = activate(h, gated)  # recomputed unscaled activation [N, I]
        a = a0 * scale.unsqueeze(-1) if scale is not None else a0
        grad_w_out = torch.zeros_like(w_out) if need_w_out else None
        grad_a = h.new_empty(rows, inner)
        for e, start, end in _slices(group_sizes):
            if need_w_out:
                torch.mm(grad_out[start:end].t(), a[start:end], out=grad_w_out[e])
            torch.mm(grad_out[start:end], w_out[e], out=grad_a[start:end])
        del a
        grad_scale = (grad_a * a0).sum(-1) if scale is not None and need_scale else None
        if scale is not None:
            grad_a.mul_(scale.unsqueeze(-1))
        del a0

        if gated:  # d(silu(g) * u) = u * silu'(g) dg + silu(g) du
            gate, up = h.chunk(2, dim=-1)
            grad_h = torch.cat([torch.ops.aten.silu_backward(grad_a * up, gate), grad_a * F.silu(gate)], dim=-1)
        else:
            grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        del grad_a

        grad_x = grad_w_in = None
        xp = (x if row_index is None else x.index_select(0, row_index)) if need_w_in else None
        grad_xp = h.new_empty(rows, x.shape[1]) if need_x else None
        if need_w_in:
            grad_w_in = torch.zeros_like(w_in)
        for e, start, end in _slices(group_sizes):
            if need_w_in:
                torch.mm(grad_h[start:end].t(), xp[start:end], out=grad_w_in[e])
            if need_x:
                torch.mm(grad_h[start:end], w_in[e], out=grad_xp[start:end])
        if need_x:
            grad_x = grad_xp if row_index is None else torch.zeros_like(x).index_add_(0, row_index, grad_xp)
        return grad_x, None, grad_w_in, grad_w_out, grad_scale, None, None


def grouped_ffn(x: Tensor, row_index: Tensor | None, group_sizes: list[int], w_in: Tensor, w_out: Tensor,
                scale: Tensor | None = None, gated: bool = True) -> Tensor:
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
    """
    return _GroupedFFN.apply(x, row_index, w_in, w_out, scale, group_sizes, gated)
