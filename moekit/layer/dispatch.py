"""Dispatch: move tokens to their experts and back. It never decides anything.

Token-choice and expert-choice routing arrive as flat assignments (token, expert, weight).
`plan_dispatch` orders them by expert (dropping the overflow when a capacity is set) with one
stable sort; `permute` gathers the rows; `combine` folds the weights into one scatter-add.
Soft MoE has its own pair, `soft_dispatch` / `soft_combine`, since slots are weighted averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Which assignments run, grouped by expert.

    Attributes:
        order: [M] assignment indices, expert-major (expert 0's first); dropped ones left out.
        group_sizes: tokens per expert in `order`, length E (Python ints, for splitting).
        num_dropped: assignments removed by the capacity limit.
    """

    order: Tensor
    group_sizes: list[int]
    num_dropped: int


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * assignments / E); assignments = tokens * k."""
    return math.ceil(capacity_factor * num_assignments / num_experts)


#: with at most this many (assignment, expert) cells, the order comes from counting, not sorting
COUNTING_SORT_MAX_CELLS = 4096
#: with at most this many assignments (a decoding step) the order is worked out in Python: one read of the
#: expert ids replaces a dozen tiny tensor ops
PYTHON_ORDER_MAX_ASSIGNMENTS = 32


def _counting_order(expert_index: Tensor, counts: Tensor, num_experts: int) -> Tensor:
    """The stable expert-major order without a sort (decoding: a few assignments).

    Assignment n goes to slot start[e_n] + (number of earlier assignments to e_n), read off a running
    count over a one-hot [N, E] table; equal to `argsort(expert_index, stable=True)`.
    """
    one_hot = torch.nn.functional.one_hot(expert_index, num_experts)
    rank = one_hot.cumsum(0).gather(1, expert_index.unsqueeze(1)).squeeze(1) - 1
    slot = (counts.cumsum(0) - counts)[expert_index] + rank
    return torch.empty_like(expert_index).scatter_(0, slot, torch.arange(expert_index.numel(),
                                                                         device=expert_index.device))


def plan_dispatch(
    expert_index: Tensor,
    num_experts: int,
    weights: Tensor | None = None,
    num_experts_per_tok: int = 1,
    capacity: int | None = None,
) -> DispatchPlan:
    """Group assignments by expert; with `capacity`, keep at most that many per expert.

    Overflow is dropped deterministically by router priority: an assignment made as a token's
    first choice beats any second choice (GShard), then the larger router weight wins, then the
    earlier token. `expert_index`/`weights` are token-major with `num_experts_per_tok` per token.
    """
    if capacity is None and expert_index.numel() <= PYTHON_ORDER_MAX_ASSIGNMENTS:
        experts = expert_index.tolist()
        sizes = [0] * num_experts
        for expert in experts:
            sizes[expert] += 1
        order = sorted(range(len(experts)), key=experts.__getitem__)  # Python's sort is stable
        return DispatchPlan(torch.tensor(order, dtype=torch.long, device=expert_index.device), sizes, 0)
    counts = torch.bincount(expert_index, minlength=num_experts)
    if capacity is None:
        if expert_index.numel() * num_experts <= COUNTING_SORT_MAX_CELLS:
            order = _counting_order(expert_index, counts, num_experts)
        else:
            order = torch.argsort(expert_index, stable=True)
        return DispatchPlan(order, counts.tolist(), 0)
    if weights is None:
        raise ValueError("plan_dispatch: a capacity needs the router weights to rank assignments")
    n = expert_index.numel()
    rank = torch.arange(n, device=expert_index.device) % num_experts_per_tok
    # least significant key first; every sort is stable, and the start order is token order
    order = torch.argsort(-weights, stable=True)
    order = order[torch.argsort(rank[order], stable=True)]
    order = order[torch.argsort(expert_index[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n, device=expert_index.device) - starts[expert_index[order]]
    kept = order[position < capacity]
    group_sizes = counts.clamp(max=capacity).tolist()
    return DispatchPlan(kept, group_sizes, n - kept.numel())


def permute(x: Tensor, token_index: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of `x: [T, H]` in dispatch order: [M, H]."""
    return x[token_index[plan.order]]


def combine(expert_out: Tensor, token_index: Tensor, weights: Tensor | None, plan: DispatchPlan,
            num_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back to tokens: [T, H]; dropped assignments add 0.

    Pass `weights=None` when the experts already applied them (`GroupedExperts(row_scale=...)`).
    """
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    if weights is not None:
        expert_out = expert_out * weights[plan.order].unsqueeze(-1).to(expert_out.dtype)
    return out.index_add_(0, token_index[plan.order], expert_out)


def soft_dispatch(x: Tensor, dispatch: Tensor, num_experts: int, slots_per_expert: int) -> tuple[Tensor, list[int]]:
    """Soft MoE slot inputs D^T X, regrouped expert-major: ([E * B * slots, H], group sizes)."""
    hidden = x.shape[-1]
    num_sequences = dispatch.shape[1] // (num_experts * slots_per_expert)
    slots = dispatch.t().to(x.dtype) @ x  # [B * E * p, H]
    slots = slots.view(num_sequences, num_experts, slots_per_expert, hidden).transpose(0, 1)
    return slots.reshape(-1, hidden), [num_sequences * slots_per_expert] * num_experts


def soft_combine(slot_out: Tensor, combine_weights: Tensor, num_experts: int, slots_per_expert: int) -> Tensor:
    """Soft MoE token outputs C Y~: [T, H]."""
    hidden = slot_out.shape[-1]
    num_sequences = combine_weights.shape[1] // (num_experts * slots_per_expert)
    slot_out = slot_out.view(num_experts, num_sequences, slots_per_expert, hidden).transpose(0, 1)
    return combine_weights.to(slot_out.dtype) @ slot_out.reshape(-1, hidden)
