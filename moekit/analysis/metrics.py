"""What a router did, in numbers: load and balance, entropy, drops, co-activation, consistency, specialisation.

Every function takes the routing of one MoE layer as plain tensors, so it serves moekit's own layers and
transformers' models alike (`moekit.hf.RoutingCapture` records the same thing):

- `expert_index`: [N, k] long, the experts each of N real tokens chose (padding already removed: see
  :func:`drop_padding`), one row per token, choices in rank order (first choice first);
- `weights`: [N, k] float, the router weights of those choices (needed only where priority matters);
- `num_experts`: E.

k = E (every token uses every expert) and k = 1 are ordinary cases. The formulas and their sources are in
`docs/analysis.md`; `tests/test_analysis_metrics.py` checks each against a hand-computed value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layer.balance import max_violation
from ..layer.dispatch import expert_capacity, plan_dispatch

__all__ = [
    "DomainInformation",
    "coactivation",
    "coefficient_of_variation",
    "dead_experts",
    "domain_mutual_information",
    "drop_padding",
    "dropped_assignments",
    "dropped_by_position",
    "effective_experts",
    "expert_load",
    "layer_consistency",
    "load_share_of_ideal",
    "max_violation",
    "max_violation_batch",
    "mutual_information",
    "routing_entropy",
    "saturated_experts",
    "token_specialisation",
]


def _check(expert_index: Tensor, num_experts: int) -> Tensor:
    if expert_index.dim() != 2:
        raise ValueError(f"expert_index must be [tokens, k], got shape {tuple(expert_index.shape)}")
    if expert_index.numel() and (int(expert_index.min()) < 0 or int(expert_index.max()) >= num_experts):
        raise ValueError(f"expert_index holds ids outside 0..{num_experts - 1}")
    return expert_index.long()


def drop_padding(expert_index: Tensor, attention_mask: Tensor) -> Tensor:
    """The rows of `expert_index` ([B*S, k] or [B, S, k]) whose `attention_mask` ([B, S]) is 1: real tokens only."""
    flat = expert_index.reshape(-1, expert_index.shape[-1])
    keep = attention_mask.reshape(-1).bool()
    if keep.numel() != flat.shape[0]:
        raise ValueError(f"attention_mask has {keep.numel()} positions but expert_index has {flat.shape[0]} rows")
    return flat[keep]


def expert_load(expert_index: Tensor, num_experts: int) -> Tensor:
    """Assignments each expert received: [E] counts (a token with k choices counts once for each)."""
    index = _check(expert_index, num_experts)
    return torch.bincount(index.reshape(-1), minlength=num_experts)


def load_share_of_ideal(load: Tensor) -> Tensor:
    """Each expert's load over the ideal (all assignments spread evenly): 1 everywhere at perfect balance."""
    load = load.double()
    ideal = load.sum() / load.numel()
    return load / ideal if ideal > 0 else torch.zeros_like(load)


def max_violation_batch(loads: list[Tensor]) -> float:
    """MaxVio_batch (Wang et al. 2024): MaxVio of each batch's load, averaged over the batches."""
    if not loads:
        raise ValueError("max_violation_batch needs the load of at least one batch")
    return sum(float(max_violation(load)) for load in loads) / len(loads)


def coefficient_of_variation(load: Tensor) -> float:
    """Standard deviation over mean of the expert loads (population std; 0 at perfect balance)."""
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


def routing_entropy(load: Tensor) -> float:
    """Entropy (nats) of the share of assignments each expert got: log E at perfect balance, 0 with one expert."""
    p = load.double() / load.sum() if load.sum() > 0 else load.double()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_experts(load: Tensor) -> float:
    """exp(routing entropy): the number of equally loaded experts that would give the same entropy."""
    return math.exp(routing_entropy(load))


def dead_experts(load: Tensor) -> list[int]:
    """Experts that received no assignment."""
    return [int(e) for e in torch.nonzero(load == 0).flatten()]


def saturated_experts(load: Tensor, capacity_factor: float) -> list[int]:
    """Experts whose load exceeds the capacity `capacity_factor` x ideal would allow (they would drop tokens)."""
    capacity = expert_capacity(int(load.sum()), load.numel(), capacity_factor)
    return [int(e) for e in torch.nonzero(load > capacity).flatten()]


def dropped_assignments(expert_index: Tensor, weights: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """[N, k] bool: the assignments a capacity of `capacity_factor` x ideal would drop, with moekit's own priority
    (`plan_dispatch`: first choices first, then larger weight, then earlier token)."""
    index = _check(expert_index, num_experts)
    flat_index = index.reshape(-1)
    capacity = expert_capacity(flat_index.numel(), num_experts, capacity_factor)
    plan = plan_dispatch(flat_index, num_experts, weights.reshape(-1), index.shape[1], capacity)
    dropped = torch.ones(flat_index.numel(), dtype=torch.bool)
    dropped[plan.order.cpu()] = False
    return dropped.view_as(index)


def dropped_by_position(expert_index: Tensor, weights: Tensor, num_experts: int, capacity_factor: float,
                        positions: Tensor, num_positions: int) -> tuple[float, Tensor]:
    """Which assignments a capacity of `capacity_factor` would drop (:func:`dropped_assignments`), and where in
    the sequence they sit.

    `positions`: [N] the position of each token in its sequence. Returns (dropped fraction of all assignments,
    [num_positions] the dropped fraction of the assignments at each position; 0 where a position has none).
    """
    dropped = dropped_assignments(expert_index, weights, num_experts, capacity_factor).reshape(-1)
    position_of = positions.long().repeat_interleave(expert_index.shape[1])
    total = torch.bincount(position_of, minlength=num_positions).double()
    lost = torch.bincount(position_of[dropped], minlength=num_positions).double()
    by_position = torch.where(total > 0, lost / total.clamp(min=1), torch.zeros_like(total))
    return int(dropped.sum()) / max(dropped.numel(), 1), by_position


def coactivation(expert_index: Tensor, num_experts: int) -> Tensor:
    """P(expert b chosen | expert a chosen) for the same token: [E, E], row a; 0 on the diagonal and for dead a."""
    index = _check(expert_index, num_experts)
    one_hot = torch.zeros(index.shape[0], num_experts, dtype=torch.float64)
    one_hot.scatter_(1, index, 1.0)
    together = one_hot.T @ one_hot  # [E, E]: tokens that chose both a and b
    chosen = together.diagonal().clone()
    together.fill_diagonal_(0.0)
    return torch.where(chosen[:, None] > 0, together / chosen.clamp(min=1)[:, None], torch.zeros_like(together))


def layer_consistency(first_choice: Tensor, next_first_choice: Tensor, num_experts: int) -> float:
    """How well layer l's first choice predicts layer l+1's: the share of tokens whose next-layer expert is the one
    most often chosen after their layer-l expert (1: fully determined; 1/E or so: unrelated)."""
    if first_choice.shape != next_first_choice.shape or first_choice.dim() != 1:
        raise ValueError("layer_consistency takes two [N] vectors of first choices for the same tokens")
    if first_choice.numel() == 0:
        return 0.0
    pairs = torch.zeros(num_experts, num_experts, dtype=torch.long)
    pairs.index_put_((first_choice.long(), next_first_choice.long()), torch.ones_like(first_choice, dtype=torch.long),
                     accumulate=True)
    return float(pairs.max(dim=1).values.sum()) / first_choice.numel()


def token_specialisation(token_ids: Tensor, expert_index: Tensor, num_experts: int,
                         min_occurrences: int = 1) -> tuple[float, float]:
    """OLMoE's token-id specialisation: for each token id seen at least `min_occurrences` times, the share of its
    occurrences routed to the expert it goes to most; averaged over ids weighted by occurrences.

    Returns (that share, the random baseline k/E).
    """
    index = _check(expert_index, num_experts)
    n, k = index.shape
    ids = token_ids.long().reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"token_ids has {ids.numel()} tokens but expert_index has {n} rows")
    vocab = int(ids.max()) + 1 if n else 1
    table = torch.zeros(vocab, num_experts, dtype=torch.long)
    table.index_put_((ids.repeat_interleave(k), index.reshape(-1)), torch.ones(n * k, dtype=torch.long),
                     accumulate=True)
    occurrences = torch.bincount(ids, minlength=vocab)
    seen = occurrences >= max(min_occurrences, 1)
    if not bool(seen.any()):
        return 0.0, k / num_experts
    best = table.max(dim=1).values
    return float(best[seen].sum()) / float(occurrences[seen].sum()), k / num_experts


@dataclass(frozen=True)
class DomainInformation:
    """Mutual information between a token's domain and the experts it chose, with what chance gives."""

    mutual_information: float  # nats
    baseline_mean: float  # mean over domain labels shuffled across tokens
    baseline_p95: float  # 95th percentile of the shuffled values
    load_by_domain: Tensor  # [D, E] assignments per domain and expert


def mutual_information(table: Tensor) -> float:
    """I(row; column) in nats of a contingency table of counts (0 for an empty table)."""
    if table.sum() <= 0:
        return 0.0
    joint = table.double() / table.sum()
    rows, cols = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * (joint[mask] / (rows @ cols)[mask]).log()).sum())


def domain_mutual_information(domain_ids: Tensor, expert_index: Tensor, num_experts: int, num_domains: int,
                              permutations: int = 100, seed: int = 0) -> DomainInformation:
    """I(domain; expert) over all assignments, and the same with the domain labels permuted across tokens
    `permutations` times (seeded), so a reader sees what chance gives at this sample size."""
    index = _check(expert_index, num_experts)
    n, k = index.shape
    domains = domain_ids.long().reshape(-1)
    if domains.numel() != n:
        raise ValueError(f"domain_ids has {domains.numel()} tokens but expert_index has {n} rows")

    def table_of(labels: Tensor) -> Tensor:
        table = torch.zeros(num_domains, num_experts, dtype=torch.long)
        table.index_put_((labels.repeat_interleave(k), index.reshape(-1)), torch.ones(n * k, dtype=torch.long),
                         accumulate=True)
        return table

    observed = table_of(domains)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.tensor([mutual_information(table_of(domains[torch.randperm(n, generator=generator)]))
                             for _ in range(permutations)], dtype=torch.float64)
    return DomainInformation(mutual_information(observed), float(shuffled.mean()) if permutations else 0.0,
                             float(torch.quantile(shuffled, 0.95)) if permutations else 0.0, observed)
