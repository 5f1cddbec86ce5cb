"""Gradients under DP x EP: dense ones averaged by DDP, expert ones summed over replicas, one global norm.

After backward, a rank's expert gradient already sums every rank of its expert-parallel group (the exchange's
backward brings it), each rank's loss taken as is. `reduce_expert_grads` sums it over the ranks that hold the
same slice and divides by the world size, which gives the same mean as DDP's for the dense parameters: the
gradient a single process computes on the whole global batch, split into micro-batches of one rank's size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.moe import MoELayer
from .mesh import ParallelGroups


def _flat_grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _all_reduce_in_place(tensors: list[Tensor], group, size: int) -> None:
    """Sum `tensors` over `group` with one all-reduce of their concatenation (skipped when `size` is 1)."""
    if not tensors or size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_expert_grads(expert_params: list[nn.Parameter], groups: ParallelGroups) -> None:
    """Sum the expert gradients over `expert_dp_group` (one all-reduce) and divide by the world size."""
    grads = _flat_grads(expert_params)
    _all_reduce_in_place(grads, groups.expert_dp_group, groups.dp_size)
    for g in grads:
        g.div_(groups.world_size)


def clip_grad_norm_(dense_params: list[nn.Parameter], expert_params: list[nn.Parameter], max_norm: float,
                    groups: ParallelGroups) -> Tensor:
    """Clip every gradient by the norm of the whole model's gradient (dense ones counted once, each expert slice
    once), as `torch.nn.utils.clip_grad_norm_` does in one process; returns that total norm."""
    dense, experts = _flat_grads(dense_params), _flat_grads(expert_params)
    if not dense + experts:
        return torch.zeros(())
    zero = torch.zeros((), dtype=torch.float32, device=(dense + experts)[0].device)
    dense_sq = sum((g.float().pow(2).sum() for g in dense), zero)
    expert_sq = sum((g.float().pow(2).sum() for g in experts), zero.clone())
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(coef.to(g.dtype))
    return total


def all_reduce_router_loads(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum every MoE layer's router-choice count over all ranks, before the aux-loss-free bias update, so the
    replicated biases move identically everywhere (as one process counting every micro-batch would)."""
    loads = [m.load_since_update for m in model.modules() if isinstance(m, MoELayer)]
    _all_reduce_in_place(loads, groups.dense_group, groups.world_size)
