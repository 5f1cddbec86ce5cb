"""The token exchange of expert parallelism: `torch.distributed.all_to_all_single` with uneven splits.

`all_to_all` wraps the collective in an autograd function whose backward is the same exchange with the
splits swapped (the gradient of row r goes back to the rank that sent row r), so a loss on the rows a rank
receives trains the tensors another rank sent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.dtype = out_splits, in_splits, group, x.dtype
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank sends and receives this exchange's gradient in the forward's dtype: under autocast a rank's
        # gradient may come back in another precision, and the peers size their buffers by the dtype they expect
        grad = grad.to(ctx.dtype).contiguous()
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    # x: [sum(in_splits), ...] rows to send, rank by rank; out: [sum(out_splits), ...] rows received, rank by rank
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Send rows `x[sum(in_splits[:d]) : sum(in_splits[:d+1])]` to rank d of `group`; receive `sum(out_splits)`
    rows, rank d's first (`out_splits[d]` of them). Differentiable when `x` requires grad.

    `x` is [sum(in_splits), ...]; the result [sum(out_splits), ...] (trailing dimensions unchanged). Both split
    lists have one entry per rank of `group`.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _exchange(x, out_splits, in_splits, group)


def exchange_counts(counts: Tensor, group=None) -> Tensor:
    """Each rank's `counts[d]` (a row per destination rank d) goes to rank d: returns the rows every rank sent
    here, in rank order. The first step of an uneven exchange: each side learns how much it will receive.

    `counts` is [ranks, C] (C counts per destination, e.g. token rows and assignments); the result is [ranks, C],
    row s what rank s sent here.
    """
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received
