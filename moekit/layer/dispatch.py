"""Dispatch: move tokens to their experts and back. It never decides anything.

Token-choice and expert-choice routing arrive as flat assignments (token, expert, weight).
`plan_dispatch` orders them by expert (dropping the overflow when a capacity is set) with one
stable sort; `permute` gathers the rows; `combine` folds the weights into one scatter-add.
A `TokenDispatcher` carries a layer's grouped assignments to its experts and their results back to the
token rows: `LocalDispatcher` when the layer holds every expert, the expert-parallel one
(`moekit.distributed`) when ranks share them; `MoELayer` calls whichever it holds the same way.
Soft MoE has its own pair, `soft_dispatch` / `soft_combine`, since slots are weighted averages.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .experts import GroupedExperts


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
    """Slots per expert: ceil(capacity_factor * assignments / E); assignments = tokens * k.

    A factor above E gives a capacity above the number of assignments, which drops nothing; the factor is
    capped at E first, so a huge factor cannot overflow and still drops nothing.
    """
    return math.ceil(min(capacity_factor, num_experts) * num_assignments / num_experts)


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
    if weights is not None:
        expert_out = expert_out * weights[plan.order].unsqueeze(-1).to(expert_out.dtype)
    return scatter_rows(expert_out, token_index[plan.order], num_tokens)


def scatter_rows(rows: Tensor, row_index: Tensor, num_rows: int) -> Tensor:
    """Sum `rows: [N, H]` into `num_rows` rows: row n adds into row `row_index[n]`; [num_rows, H], `rows`' dtype."""
    return rows.new_zeros(num_rows, rows.shape[-1]).index_add_(0, row_index, rows)


class TokenDispatcher(ABC):
    """How a layer's routed assignments reach its experts and come back: the one place local and
    expert-parallel layers differ.

    A layer holds one (`MoELayer.dispatcher`) and never asks which: `LocalDispatcher` runs the layer's own
    experts; `moekit.distributed.ExpertParallelDispatcher` (put in place by `shard_experts`) sends the rows
    to the ranks holding their experts. A dispatcher holds no parameters, so a layer's state dict is the
    same under either.
    """

    @abstractmethod
    def dispatch_and_combine(self, experts: GroupedExperts, x: Tensor, group_sizes: list[int], row_scale: Tensor,
                             row_index: Tensor) -> Tensor:
        """The routed experts' weighted sum for every token row of `x: [T, H]`: [T, H].

        `group_sizes` (length E, every expert of the layer), `row_scale` and `row_index` ([N] each) are the
        grouped assignments as `MoELayer` plans them: expert e's assignments are the e-th slice, assignment n
        reads token `row_index[n]` and weighs its result by `row_scale[n]`. `experts` is the layer's
        `GroupedExperts` (all E of them, or this rank's slice under expert parallelism).
        """

    def stats(self) -> dict[str, Tensor]:
        """What the last `dispatch_and_combine` cost beyond computing, as scalar tensors (none for local)."""
        return {}


class LocalDispatcher(TokenDispatcher):
    """Every expert is in this process: run them on the grouped rows and scatter-add into token order."""

    def dispatch_and_combine(self, experts: GroupedExperts, x: Tensor, group_sizes: list[int], row_scale: Tensor,
                             row_index: Tensor) -> Tensor:
        expert_out = experts(x, group_sizes, row_scale=row_scale, row_index=row_index)
        return scatter_rows(expert_out, row_index, x.shape[0])

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class _Sequences:
    """Where each of T tokens sits in a zero-padded [B, L, ...] batch of its own sequence (L: the longest).

    Soft MoE mixes the tokens of one sequence only. Computing each sequence's slots from its own rows (one batched
    matmul over sequences) rather than one [T, B * slots] product with zeros outside a token's sequence keeps a NaN
    or inf inside the sequence it came from: 0 * NaN is NaN, so the zeros would spread it to every sequence.
    `seq_ids=None` means B equal-length sequences one after the other (a plain [B, S, H] input, no copy);
    otherwise `seq_ids` gives each token's sequence, tokens grouped by sequence in order (`MoELayer` after
    padding removal).
    """

    def __init__(self, num_tokens: int, num_sequences: int, seq_ids: Tensor | None, device: torch.device) -> None:
        self.num_tokens, self.num_sequences, self.seq_ids = num_tokens, num_sequences, seq_ids
        if seq_ids is None:
            self.length = num_tokens // num_sequences if num_sequences else 0
            self.position = None
        else:
            counts = torch.bincount(seq_ids, minlength=num_sequences)
            self.position = torch.arange(num_tokens, device=device) - (counts.cumsum(0) - counts)[seq_ids]
            self.length = int(counts.max()) if num_tokens else 0

    def batch(self, rows: Tensor) -> Tensor:
        """[T, C] token rows -> [B, L, C], zeros at padded positions."""
        if self.position is None:
            return rows.view(self.num_sequences, self.length, rows.shape[-1])
        out = rows.new_zeros(self.num_sequences, self.length, rows.shape[-1])
        return out.index_put((self.seq_ids, self.position), rows)

    def unbatch(self, batched: Tensor) -> Tensor:
        """[B, L, C] -> [T, C] token rows (padded positions left out)."""
        if self.position is None:
            return batched.reshape(self.num_tokens, batched.shape[-1])
        return batched[self.seq_ids, self.position]

    def own_block(self, weights: Tensor, slots: int) -> Tensor:
        """[T, B * S] weights (zero outside each token's sequence) -> [B, L, S]: each token's own sequence's block."""
        blocks = weights.view(self.num_tokens, self.num_sequences, slots)
        if self.position is None:  # token t of sequence b is row b * L + t: the diagonal blocks, as a view
            square = blocks.view(self.num_sequences, self.length, self.num_sequences, slots)
            return square.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        rows = torch.arange(self.num_tokens, device=weights.device)
        return self.batch(blocks[rows, self.seq_ids])


def soft_dispatch(x: Tensor, dispatch: Tensor, num_experts: int, slots_per_expert: int,
                  seq_ids: Tensor | None = None) -> tuple[Tensor, list[int]]:
    """Soft MoE slot inputs D^T X per sequence, regrouped expert-major: ([E * B * slots, H], group sizes).

    `dispatch` is [T, B * E * slots] with zeros outside a token's own sequence; `seq_ids` as in `_Sequences`
    (None: B equal-length sequences in order). A non-finite token affects only its own sequence's slots.
    """
    hidden = x.shape[-1]
    num_sequences = dispatch.shape[1] // (num_experts * slots_per_expert)
    sequences = _Sequences(x.shape[0], num_sequences, seq_ids, x.device)
    weights = sequences.own_block(dispatch.to(x.dtype), num_experts * slots_per_expert)  # [B, L, E * p]
    slots = weights.transpose(1, 2) @ sequences.batch(x)  # [B, E * p, H]
    slots = slots.view(num_sequences, num_experts, slots_per_expert, hidden).transpose(0, 1)
    return slots.reshape(-1, hidden), [num_sequences * slots_per_expert] * num_experts


def soft_combine(slot_out: Tensor, combine_weights: Tensor, num_experts: int, slots_per_expert: int,
                 seq_ids: Tensor | None = None) -> Tensor:
    """Soft MoE token outputs C Y~ per sequence: [T, H] (`seq_ids` as in `soft_dispatch`)."""
    hidden = slot_out.shape[-1]
    num_sequences = combine_weights.shape[1] // (num_experts * slots_per_expert)
    sequences = _Sequences(combine_weights.shape[0], num_sequences, seq_ids, slot_out.device)
    slot_out = slot_out.view(num_experts, num_sequences, slots_per_expert, hidden).transpose(0, 1)
    slot_out = slot_out.reshape(num_sequences, num_experts * slots_per_expert, hidden)  # [B, E * p, H]
    weights = sequences.own_block(combine_weights.to(slot_out.dtype), num_experts * slots_per_expert)
    return sequences.unbatch(weights @ slot_out)
