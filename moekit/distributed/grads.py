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


def reduce_expert_grads(expert_params: list[nn.Parameter], groups: ParallelGroups) -> None:
    """Sum the expert gradients over `expert_dp_group` (one all-reduce) and divide by the world size."""
    grads = _flat_grads(expert_params)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if groups.dp_size > 1:
        dist.all_reduce(flat, group=groups.expert_dp_group)
    flat.div_(groups.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(dense_params: list[nn.Parameter], expert_params: list[nn.Parameter], max_norm: float,
                    groups: ParallelGroups) -> Tensor:
    """Clip every gradient by the norm of the whole model's gradient (dense ones counted once, each expert slice
    once), as `torch.nn.utils.clip_grad_norm_` does in one process; returns that total norm."""
    dense, experts = _flat_grads(dense_params), _flat_grads(expert_params)
    reference = (dense or experts)[0] if (dense or experts) else None
    if reference is None:
        return torch.zeros(())
    zero = torch.zeros((), dtype=torch.float32, device=reference.device)
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
    if not loads or groups.world_size == 1:
        return
    flat = torch.cat(loads)
    dist.all_reduce(flat, group=groups.dense_group)
    offset = 0
    for load in loads:
        load.copy_(flat[offset:offset + load.numel()])
        offset += load.numel()
