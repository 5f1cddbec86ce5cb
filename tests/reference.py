"""A deliberately naive MoE forward: one token at a time, straight from the published formulas.

It shares no code with moekit's vectorised routers and dispatch. It reads only a `MoEConfig` and a
state dict (the checkpoint names: `router.weight`, `experts.gate_up_proj`, ...), loops over tokens
and experts in Python, and uses plain torch arithmetic on vectors, so autograd differentiates it
end to end. Slow on purpose: it is a specification, not an implementation.

Formulas (each from the paper named; the router docstrings in moekit/layer/routers.py cite them too):
- top-k (Mixtral): p = softmax(W x) (or sigmoid), keep the k best p (+ bias, which only selects),
  weights p (renormalised over the k with norm_topk_prob) * routed_scaling_factor.
- Switch: top-1, weight p; capacity C = ceil(capacity_factor * T * k / E), overflow dropped by
  priority (choice rank, then larger weight, then earlier token).
- noisy top-k (Shazeer 2017, eval: no noise): softmax over the k largest (W_g x).
- DeepSeek-V3: choice = s + b; group score = sum of the group's top-2 choices; keep topk_group
  groups; top-k by choice among them; weights s (renormalised) * routed_scaling_factor.
- expert choice (Zhou 2022): S = softmax(X W^T); expert e takes its C = min(T, ceil(T c / E)) best
  tokens by S[:, e]; y_t = sum over experts that took t of S[t, e] E_e(x_t).
- hierarchical (Shazeer 2017 app. B): softmax over the kept primary logits times softmax over the
  kept secondary logits of each kept group.
- Soft MoE (Puigcerver 2023): per sequence, D = softmax over tokens, slot inputs sum_t D[t,s] x_t,
  expert e runs slots e*p .. e*p+p-1, C = softmax over slots, y_t = sum_s C[t,s] y~_s.
Shared experts (DeepSeekMoE / Qwen2-MoE) are added to every token, times sigmoid(gate x) if gated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit import MoEConfig

#: Smallest gap allowed between the last value kept and the first value left out of any top-k.
#: Below it the choice is a near-tie and a float rounding difference could flip it.
TIE_GAP = 1e-4


# ---------------------------------------------------------------------- scalar formulas
def silu(v: Tensor) -> Tensor:
    return v / (1.0 + torch.exp(-v))


def gelu(v: Tensor) -> Tensor:
    """Exact GELU: v * Phi(v), Phi the standard normal CDF."""
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def softmax(v: Tensor) -> Tensor:
    """Softmax of a 1-D tensor."""
    e = torch.exp(v - v.max())
    return e / e.sum()


def top_indices(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first; refuses a near-tie at the boundary."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if k < len(values):
        gap = values[order[k - 1]] - values[order[k]]
        assert gap > TIE_GAP, f"near-tie in top-{k} of {values}: gap {gap:.2e}; the test data is ambiguous"
    return order[:k]


# ---------------------------------------------------------------------- experts
def routed_expert(config: MoEConfig, state: dict[str, Tensor], e: int, x: Tensor) -> Tensor:
    """Routed expert e on one token x: [H] -> [H]."""
    down = state["experts.down_proj"][e]  # [H, I]
    if config.hidden_act == "silu":
        gate_up = state["experts.gate_up_proj"][e]  # [2I, H]: gate rows, then up rows
        width = config.moe_intermediate_size
        h = silu(gate_up[:width] @ x) * (gate_up[width:] @ x)
    else:
        h = gelu(state["experts.up_proj"][e] @ x)
    return down @ h


def shared_expert(config: MoEConfig, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """The (fused) shared expert on one token x: [H] -> [H]."""
    up = state["shared_experts.up_proj.weight"] @ x
    if config.hidden_act == "silu":
        h = silu(state["shared_experts.gate_proj.weight"] @ x) * up
    else:
        h = gelu(up)
    out = state["shared_experts.down_proj.weight"] @ h
    if config.shared_expert_gate:
        out = sigmoid(state["shared_experts.gate.weight"] @ x) * out  # gate weight [1, H]
    return out


# ---------------------------------------------------------------------- token-choice routing
@dataclass
class Assignment:
    """Token `token` sends itself to `expert` as its `rank`-th choice with combine `weight`."""

    token: int
    rank: int
    expert: int
    weight: Tensor


def _route_scored(config: MoEConfig, state: dict[str, Tensor], x: Tensor) -> list[tuple[int, Tensor]]:
    """topk / switch / deepseek_v3 for one token: [(expert, weight)] in choice order."""
    num_experts, k = config.num_local_experts, config.num_experts_per_tok
    logits = state["router.weight"] @ x  # [E]
    scores = sigmoid(logits) if config.scoring_func == "sigmoid" else softmax(logits)
    choice = scores.detach().tolist()
    bias = state.get("router.e_score_correction_bias")
    if bias is not None:
        choice = [c + b for c, b in zip(choice, bias.tolist(), strict=True)]

    eligible = list(range(num_experts))
    if config.router == "deepseek_v3":
        per_group = num_experts // config.n_group
        groups = [list(range(g * per_group, (g + 1) * per_group)) for g in range(config.n_group)]
        group_scores = [sum(sorted((choice[e] for e in members), reverse=True)[:2]) for members in groups]
        kept_groups = top_indices(group_scores, config.topk_group)
        eligible = sorted(e for g in kept_groups for e in groups[g])

    picked = [eligible[i] for i in top_indices([choice[e] for e in eligible], k)]
    weights = [scores[e] for e in picked]
    if config.resolved_norm_topk_prob:
        total = sum(weights)
        weights = [w / total for w in weights]
    return [(e, w * config.routed_scaling_factor) for e, w in zip(picked, weights, strict=True)]


def _route_noisy(config: MoEConfig, state: dict[str, Tensor], x: Tensor) -> list[tuple[int, Tensor]]:
    """Noisy top-k in eval (no noise): softmax over the k largest clean logits."""
    logits = state["router.weight"] @ x
    picked = top_indices(logits.detach().tolist(), config.num_experts_per_tok)
    weights = softmax(torch.stack([logits[e] for e in picked]))
    return [(e, weights[i]) for i, e in enumerate(picked)]


def _route_hierarchical(config: MoEConfig, state: dict[str, Tensor], x: Tensor) -> list[tuple[int, Tensor]]:
    """Primary gate over groups, then a secondary gate inside each kept group."""
    per_group = config.num_local_experts // config.n_group
    inner_k = config.num_experts_per_tok // config.topk_group
    primary = state["router.primary_weight"] @ x  # [G]
    secondary = state["router.weight"] @ x  # [E], group-major
    kept_groups = top_indices(primary.detach().tolist(), config.topk_group)
    group_weights = softmax(torch.stack([primary[g] for g in kept_groups]))
    routed = []
    for i, g in enumerate(kept_groups):
        members = [g * per_group + j for j in range(per_group)]
        picked = [members[j] for j in top_indices([secondary[e].item() for e in members], inner_k)]
        inner_weights = softmax(torch.stack([secondary[e] for e in picked]))
        routed += [(e, group_weights[i] * inner_weights[j]) for j, e in enumerate(picked)]
    return routed


_TOKEN_ROUTES = {
    "topk": _route_scored,
    "switch": _route_scored,
    "deepseek_v3": _route_scored,
    "noisy_topk": _route_noisy,
    "hierarchical": _route_hierarchical,
}


def token_choice_assignments(
    config: MoEConfig, state: dict[str, Tensor], tokens: list[Tensor]
) -> tuple[list[Assignment], list[Assignment]]:
    """(kept, dropped) assignments of a token-choice router over all `tokens` of the batch."""
    route = _TOKEN_ROUTES[config.router]
    assignments = [
        Assignment(t, rank, e, w) for t, x in enumerate(tokens) for rank, (e, w) in enumerate(route(config, state, x))
    ]
    if config.capacity_factor is None:
        return assignments, []
    capacity = math.ceil(config.capacity_factor * len(tokens) * config.num_experts_per_tok / config.num_local_experts)
    kept, dropped = [], []
    for e in range(config.num_local_experts):
        queue = sorted((a for a in assignments if a.expert == e), key=lambda a: (a.rank, -a.weight.item(), a.token))
        if len(queue) > capacity and queue[capacity - 1].rank == queue[capacity].rank:
            gap = queue[capacity - 1].weight.item() - queue[capacity].weight.item()
            assert gap > TIE_GAP, f"near-tie at expert {e}'s capacity: gap {gap:.2e}; the test data is ambiguous"
        kept += queue[:capacity]
        dropped += queue[capacity:]
    return kept, dropped


def _token_choice_outputs(config: MoEConfig, state: dict[str, Tensor], tokens: list[Tensor]) -> list[Tensor]:
    kept, _ = token_choice_assignments(config, state, tokens)
    outputs = [torch.zeros_like(x) for x in tokens]
    for a in kept:
        outputs[a.token] = outputs[a.token] + a.weight * routed_expert(config, state, a.expert, tokens[a.token])
    return outputs


# ---------------------------------------------------------------------- expert choice and Soft MoE
def _expert_choice_outputs(config: MoEConfig, state: dict[str, Tensor], tokens: list[Tensor]) -> list[Tensor]:
    """Each expert takes its C best tokens of the whole batch by softmax probability."""
    num_tokens, num_experts = len(tokens), config.num_local_experts
    capacity = min(num_tokens, math.ceil(num_tokens * config.capacity_factor / num_experts))
    probs = [softmax(state["router.weight"] @ x) for x in tokens]  # T x [E]
    outputs = [torch.zeros_like(x) for x in tokens]
    for e in range(num_experts):
        for t in top_indices([p[e].item() for p in probs], capacity):
            outputs[t] = outputs[t] + probs[t][e] * routed_expert(config, state, e, tokens[t])
    return outputs


def _soft_outputs(config: MoEConfig, state: dict[str, Tensor], sequence: list[Tensor]) -> list[Tensor]:
    """Soft MoE over the tokens of one sequence."""
    phi = state["router.weight"]  # [S, H]
    num_slots, per_expert = phi.shape[0], config.slots_per_expert
    logits = [[phi[s] @ x for s in range(num_slots)] for x in sequence]  # T x S scalars
    slot_outputs = []
    for s in range(num_slots):
        dispatch = softmax(torch.stack([row[s] for row in logits]))  # over the sequence's tokens
        slot_input = sum(dispatch[t] * x for t, x in enumerate(sequence))
        slot_outputs.append(routed_expert(config, state, s // per_expert, slot_input))
    outputs = []
    for row in logits:
        combine = softmax(torch.stack(row))  # over slots
        outputs.append(sum(combine[s] * slot_outputs[s] for s in range(num_slots)))
    return outputs


# ---------------------------------------------------------------------- the layer
def reference_moe(config: MoEConfig, state: dict[str, Tensor], sequences: list[Tensor]) -> list[Tensor]:
    """MoE layer output for each sequence ([T_b, H] each, padding already removed).

    Token-choice and expert-choice routers see all tokens of all sequences as one batch (capacities
    count them all); Soft MoE mixes tokens within a sequence only.
    """
    tokens = [x for sequence in sequences for x in sequence.unbind(0)]
    if config.router == "soft":
        outputs = [y for sequence in sequences for y in _soft_outputs(config, state, list(sequence.unbind(0)))]
    elif config.router == "expert_choice":
        outputs = _expert_choice_outputs(config, state, tokens)
    else:
        outputs = _token_choice_outputs(config, state, tokens)
    if config.n_shared_experts:
        outputs = [y + shared_expert(config, state, x) for x, y in zip(tokens, outputs, strict=True)]
    lengths = [sequence.shape[0] for sequence in sequences]
    flat = torch.stack(outputs) if outputs else torch.zeros(0, config.hidden_size)
    return list(flat.split(lengths))
