"""Routing metrics accumulated batch by batch, so an analysis of a million tokens holds no per-token table.

`LayerAccumulator.add` takes one batch of one MoE layer's routing and folds it into counts whose size does not grow
with the number of tokens:

- expert load [E], co-activation counts [E, E], first-choice transitions to the next MoE layer [E, E];
- one MaxVio per batch (MaxVio_batch is their mean), dropped and total assignments per position [block_size];
- (token id, expert) counts, kept sparse: bounded by the distinct pairs seen, not by the tokens;
- per domain, the counts of each distinct expert set a token chose: enough for the observed mutual information
  and for an exact permutation baseline (a permutation of domain labels only re-deals these sets among domains).

`result()` turns the counts into the per-layer numbers of analysis.json; each agrees with the whole-table function
of the same name in `metrics.py` (`tests/test_analysis_accumulate.py` checks that on split batches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .metrics import (
    coefficient_of_variation,
    dead_experts,
    dropped_assignments,
    effective_experts,
    load_share_of_ideal,
    max_violation,
    mutual_information,
    routing_entropy,
    saturated_experts,
)

__all__ = ["TOP_TOKENS", "LayerAccumulator"]

#: how many tokens analysis.json lists per expert
TOP_TOKENS = 10


class LayerAccumulator:
    """Streaming counts for one MoE layer (E experts, k choices, windows of at most `block_size` tokens)."""

    def __init__(self, layer: int, num_experts: int, top_k: int, block_size: int, capacity_factor: float,
                 num_domains: int = 0) -> None:
        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.block_size, self.capacity_factor, self.num_domains = block_size, capacity_factor, num_domains
        self.load = torch.zeros(num_experts, dtype=torch.long)
        self.together = torch.zeros(num_experts, num_experts, dtype=torch.long)
        self.transitions = torch.zeros(num_experts, num_experts, dtype=torch.long)  # first choice here -> next layer
        self.batch_max_violations: list[float] = []
        self.dropped_at = torch.zeros(block_size, dtype=torch.long)
        self.assigned_at = torch.zeros(block_size, dtype=torch.long)
        self._token_keys = torch.zeros(0, dtype=torch.long)  # sorted id * E + expert
        self._token_counts = torch.zeros(0, dtype=torch.long)
        self._set_of: dict[tuple[int, ...], int] = {}  # a sorted expert set -> its column in _set_counts
        self._set_counts = torch.zeros(max(num_domains, 1), 0, dtype=torch.long)

    # ------------------------------------------------------------------ folding one batch in
    def add(self, expert_index: Tensor, weights: Tensor, token_ids: Tensor, positions: Tensor,
            domain_ids: Tensor | None = None) -> None:
        """One batch: `expert_index`/`weights` [N, k] of the N real tokens, their ids and window positions [N],
        and their domain indices [N] when the analysis has domains."""
        index = expert_index.long()
        n, k = index.shape
        if k != self.top_k or token_ids.numel() != n or positions.numel() != n:
            raise ValueError(f"layer {self.layer}: a batch of {n} tokens x {k} choices does not match its "
                             f"{token_ids.numel()} token ids / {positions.numel()} positions (k = {self.top_k})")
        if n == 0:
            return
        batch_load = torch.bincount(index.reshape(-1), minlength=self.num_experts)
        self.load += batch_load
        self.batch_max_violations.append(float(max_violation(batch_load)))
        one_hot = torch.zeros(n, self.num_experts, dtype=torch.float64)
        one_hot.scatter_(1, index, 1.0)
        self.together += (one_hot.T @ one_hot).round().long()
        dropped = dropped_assignments(index, weights, self.num_experts, self.capacity_factor).reshape(-1)
        position_of = positions.long().repeat_interleave(k)
        self.assigned_at += torch.bincount(position_of, minlength=self.block_size)
        self.dropped_at += torch.bincount(position_of[dropped], minlength=self.block_size)
        self._add_tokens(token_ids.long(), index)
        if self.num_domains:
            if domain_ids is None:
                raise ValueError(f"layer {self.layer}: the analysis has domains but a batch came without them")
            self._add_sets(domain_ids.long(), index)

    def add_transitions(self, first_choice: Tensor, next_first_choice: Tensor) -> None:
        """The same tokens' first choices here and at the next MoE layer ([N] each)."""
        self.transitions.index_put_((first_choice.long(), next_first_choice.long()),
                                    torch.ones(first_choice.numel(), dtype=torch.long), accumulate=True)

    def _add_tokens(self, token_ids: Tensor, index: Tensor) -> None:
        keys = token_ids.repeat_interleave(index.shape[1]) * self.num_experts + index.reshape(-1)
        keys = torch.cat([self._token_keys, keys])
        counts = torch.cat([self._token_counts, torch.ones(keys.numel() - self._token_counts.numel(),
                                                           dtype=torch.long)])
        self._token_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self._token_counts = torch.zeros(self._token_keys.numel(), dtype=torch.long).index_add_(0, inverse, counts)

    def _add_sets(self, domain_ids: Tensor, index: Tensor) -> None:
        sets, inverse = torch.unique(index.sort(dim=1).values, dim=0, return_inverse=True)
        columns = []
        for row in sets.tolist():
            key = tuple(row)
            if key not in self._set_of:
                self._set_of[key] = len(self._set_of)
            columns.append(self._set_of[key])
        grow = len(self._set_of) - self._set_counts.shape[1]
        if grow:
            self._set_counts = torch.cat([self._set_counts, torch.zeros(self._set_counts.shape[0], grow,
                                                                        dtype=torch.long)], dim=1)
        column = torch.tensor(columns, dtype=torch.long)[inverse]
        self._set_counts.index_put_((domain_ids, column), torch.ones_like(column), accumulate=True)

    # ------------------------------------------------------------------ the numbers
    @property
    def tokens(self) -> int:
        return int(self.load.sum()) // self.top_k

    def token_table(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token ids, experts, counts) of every (token id, expert) pair seen, sparse."""
        ids = torch.div(self._token_keys, self.num_experts, rounding_mode="floor")
        return ids, self._token_keys % self.num_experts, self._token_counts

    def token_specialisation(self, min_occurrences: int = 1) -> float:
        """OLMoE's token-id specialisation (see `metrics.token_specialisation`), from the sparse counts."""
        ids, _, counts = self.token_table()
        if ids.numel() == 0:
            return 0.0
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        occurrences = torch.zeros(unique_ids.numel(), dtype=torch.long).index_add_(0, inverse, counts) // self.top_k
        best = torch.zeros(unique_ids.numel(), dtype=torch.long).scatter_reduce_(0, inverse, counts, "amax")
        seen = occurrences >= max(min_occurrences, 1)
        return float(best[seen].sum()) / float(occurrences[seen].sum()) if bool(seen.any()) else 0.0

    def top_tokens(self, decode, limit: int = TOP_TOKENS) -> list[list[dict[str, Any]]]:
        """Per expert, the token ids it received most, with the share of each id's occurrences it got."""
        ids, experts, counts = self.token_table()
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        occurrences = torch.zeros(unique_ids.numel(), dtype=torch.long).index_add_(0, inverse, counts) // self.top_k
        out: list[list[dict[str, Any]]] = []
        for expert in range(self.num_experts):
            rows = torch.nonzero(experts == expert).flatten()
            # most received first; ties by lower id (ids are sorted, and the sort is stable)
            order = rows[torch.sort(counts[rows], descending=True, stable=True).indices][:limit]
            out.append([{"id": int(ids[r]), "token": decode(int(ids[r])), "count": int(counts[r]),
                         "share": int(counts[r]) / max(int(occurrences[inverse[r]]), 1)} for r in order.tolist()])
        return out

    def domain_load(self) -> Tensor:
        """[D, E] assignments per domain and expert."""
        return self._sets_to_experts(self._set_counts)

    def _sets_to_experts(self, set_counts: Tensor) -> Tensor:
        members = torch.tensor(list(self._set_of), dtype=torch.long).reshape(-1, self.top_k)  # [S, k]
        table = torch.zeros(set_counts.shape[0], self.num_experts, dtype=torch.long)
        for j in range(self.top_k):
            table.index_add_(1, members[:, j], set_counts)
        return table

    def domain_baseline(self, permutations: int, seed: int) -> Tensor:
        """I(domain; expert) with the domain labels permuted across tokens, `permutations` times (seeded)."""
        per_domain = self._set_counts.sum(dim=1)
        pool = torch.repeat_interleave(torch.arange(self._set_counts.shape[1]), self._set_counts.sum(dim=0))
        generator = torch.Generator().manual_seed(seed)
        values = []
        for _ in range(permutations):
            shuffled = pool[torch.randperm(pool.numel(), generator=generator)]
            counts = torch.stack([torch.bincount(part, minlength=self._set_counts.shape[1])
                                  for part in torch.split(shuffled, per_domain.tolist())])
            values.append(mutual_information(self._sets_to_experts(counts)))
        return torch.tensor(values, dtype=torch.float64)

    def result(self, decode, domain_names: list[str] | None = None, permutations: int = 100,
               seed: int = 0) -> dict[str, Any]:
        """This layer's entry of analysis.json (`consistency_with_next` is set by the caller, which sees both)."""
        assigned = self.assigned_at.double()
        domains = None
        if self.num_domains:
            baseline = self.domain_baseline(permutations, seed)
            domains = {"names": list(domain_names or []), "load": self.domain_load().tolist(),
                       "mutual_information": mutual_information(self.domain_load()),
                       "baseline_mean": float(baseline.mean()) if permutations else 0.0,
                       "baseline_p95": float(torch.quantile(baseline, 0.95)) if permutations else 0.0}
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "load": self.load.tolist(),
            "load_share_of_ideal": load_share_of_ideal(self.load).tolist(),
            "max_violation_global": float(max_violation(self.load)),
            "max_violation_batch": (sum(self.batch_max_violations) / len(self.batch_max_violations)
                                    if self.batch_max_violations else 0.0),
            "coefficient_of_variation": coefficient_of_variation(self.load),
            "entropy": routing_entropy(self.load),
            "entropy_max": math.log(self.num_experts),
            "effective_experts": effective_experts(self.load),
            "dead_experts": dead_experts(self.load),
            "saturated_experts": saturated_experts(self.load, self.capacity_factor),
            "dropped_fraction": int(self.dropped_at.sum()) / max(int(self.assigned_at.sum()), 1),
            "dropped_by_position": torch.where(assigned > 0, self.dropped_at.double() / assigned.clamp(min=1),
                                               torch.zeros_like(assigned)).tolist(),
            "coactivation": self.coactivation().tolist(),
            "consistency_with_next": None,
            "token_specialisation": self.token_specialisation(),
            "token_specialisation_baseline": self.top_k / self.num_experts,
            "domains": domains,
            "top_tokens": self.top_tokens(decode),
        }

    def coactivation(self) -> Tensor:
        """P(b | a) from the co-activation counts (see `metrics.coactivation`)."""
        together = self.together.double()
        chosen = together.diagonal().clone()
        together.fill_diagonal_(0.0)
        return torch.where(chosen[:, None] > 0, together / chosen.clamp(min=1)[:, None], torch.zeros_like(together))

    def consistency(self) -> float | None:
        """How well this layer's first choice predicts the next MoE layer's (see `metrics.layer_consistency`)."""
        total = int(self.transitions.sum())
        return float(self.transitions.max(dim=1).values.sum()) / total if total else None
