"""Routers: one class per routing family, all returning the same `Routing` record.

A router takes `x: [T, hidden]` (padding already removed) and decides; it never moves tokens.
Assignments are stored flat ("COO"): assignment n sends token `token_index[n]` to expert
`expert_index[n]` with combine weight `weights[n]`. Token-choice routers emit them token-major,
k per token, so `num_experts_per_tok` rows per token and the choice rank is `n % k`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .balance import noisy_topk_load_probs


@dataclass
class Routing:
    """What a router decided for one batch of T tokens.

    Attributes:
        token_index: [N] token of each assignment.
        expert_index: [N] expert of each assignment (before any capacity dropping).
        weights: [N] float32 combine weight of each assignment.
        logits: [T, L] raw router logits (L = E, or E * slots for Soft MoE); the z-loss reads them.
        probs: [T, E] per-token distribution over experts (sums to 1) for the balancing terms;
            None for Soft MoE.
        num_experts_per_tok: k for token-choice routers (assignments token-major, k per token);
            None when a token may get any number of experts.
        load_probs: [T, E] Shazeer's smooth load estimate (noisy top-k only).
        soft_dispatch, soft_combine: [T, B * E * slots] Soft MoE weights, zero outside a token's
            own sequence (Soft MoE only).
    """

    token_index: Tensor
    expert_index: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor | None
    num_experts_per_tok: int | None
    load_probs: Tensor | None = None
    soft_dispatch: Tensor | None = None
    soft_combine: Tensor | None = None

    @property
    def is_soft(self) -> bool:
        return self.soft_dispatch is not None


def _token_choice(topk_index: Tensor, topk_weights: Tensor, logits: Tensor, probs: Tensor, **extra) -> Routing:
    num_tokens, k = topk_index.shape
    token_index = torch.arange(num_tokens, device=topk_index.device).repeat_interleave(k)
    return Routing(token_index, topk_index.reshape(-1), topk_weights.reshape(-1).float(), logits, probs, k, **extra)


def _gate_weight(rows: int, hidden: int) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(rows, hidden))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default
    return weight


class Router(nn.Module):
    """Base class: holds the config; subclasses implement `forward`."""

    #: True when a token's output depends on other tokens of its sequence (leaks the future in a causal LM).
    mixes_tokens: bool = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:  # pragma: no cover
        raise NotImplementedError


class TopKRouter(Router):
    """Softmax (or sigmoid) top-k, as in Mixtral / Qwen-MoE: logits = x W^T (+ b with `router_bias`), keep the k
    best scores.

    With `norm_topk_prob` the kept weights are renormalised to sum to 1 (Mixtral). With the
    aux-loss-free balancer on, `e_score_correction_bias` is added to the scores for selection only.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.weight = _gate_weight(self.num_experts, config.hidden_size)
        # a bias on the logits (GPT-OSS's router); it shifts the scores the weights come from, unlike the selection bias
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if config.router_bias else None
        self.norm_topk_prob = config.resolved_norm_topk_prob
        self.e_score_correction_bias: Tensor | None
        if config.uses_aux_free_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse: bool = True):
        # keep the selection bias in float32 when the layer is cast to bf16/fp16 (updates are ~1e-3)
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def _scores(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(scores that weight the outputs, per-token distribution for balancing)."""
        if self.config.scoring_func == "sigmoid":
            scores = torch.sigmoid(logits.float())
            return scores, scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        scores = torch.softmax(logits.float(), dim=-1)
        return scores, scores

    def _select(self, scores: Tensor) -> Tensor:
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        return self._limit_devices(choice).topk(self.top_k, dim=-1).indices

    def _limit_devices(self, choice: Tensor) -> Tensor:
        """Device-limited routing: -inf outside each token's `max_devices_per_token` best device blocks.

        Experts are `expert_devices` contiguous blocks (one per expert-parallel rank); a block's score is the sum
        of its best ceil(k / M) selection scores (DeepSeek-V3's node-limited routing).
        """
        limit, devices = self.config.max_devices_per_token, self.config.expert_devices
        if limit is None or limit >= devices:
            return choice
        num_tokens, per_device = choice.shape[0], self.num_experts // devices
        blocks = choice.view(num_tokens, devices, per_device)
        best = min(per_device, -(-self.top_k // limit))
        block_scores = blocks.topk(best, dim=-1).values.sum(dim=-1)  # [T, D]
        keep = torch.zeros_like(block_scores, dtype=torch.bool)
        keep.scatter_(1, block_scores.topk(limit, dim=-1).indices, True)
        return blocks.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)

    #: compute the logits in float32 whatever the input dtype (DeepSeek-V3 does; Mixtral does not)
    fp32_logits: bool = False

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:
        if self.fp32_logits:
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        else:
            logits = F.linear(x, self.weight, self.bias)  # [T, E]
        scores, probs = self._scores(logits)
        topk_index = self._select(scores)
        topk_weights = scores.gather(1, topk_index)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * self.config.routed_scaling_factor
        return _token_choice(topk_index, topk_weights, logits, probs)


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1: y = p_i E_i(x) with the raw probability p_i (never renormalised).

    Pair it with `capacity_factor` for Switch's token dropping (a dropped token's MoE output is 0,
    the residual connection carries it); with `capacity_factor=None` it is dropless.
    """


class DeepSeekV3Router(TopKRouter):
    """DeepSeek-V3: sigmoid scores, selection by scores + bias within the `topk_group` best groups.

    A group's score is the sum of its two best (score + bias) values; the bias only selects, the
    weights are the raw scores, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`.
    Logits are computed in float32, as DeepSeek-V3 does, so bf16 routing matches its reference.
    """

    fp32_logits = True

    def _select(self, scores: Tensor) -> Tensor:
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        choice = self._limit_devices(choice)
        n_group, topk_group = self.config.n_group, self.config.topk_group
        if n_group > 1 and topk_group < n_group:
            num_tokens = choice.shape[0]
            per_group = self.num_experts // n_group
            grouped = choice.view(num_tokens, n_group, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)
        return choice.topk(self.top_k, dim=-1).indices


class NoisyTopKRouter(Router):
    """Shazeer et al. 2017 noisy top-k gating.

    H = x W_g + N(0, 1) * (softplus(x W_noise) + 0.01) in training (no noise in eval);
    G = softmax(KeepTopK(H, k)). Both matrices start at zero, as in the paper, so early routing is
    driven by the noise. Also emits the smooth load estimate for `load_loss`.
    """

    noise_epsilon = 1e-2

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:
        clean = F.linear(x, self.weight).float()  # [T, E]
        noise_std = F.softplus(F.linear(x, self.noise_weight).float()) + self.noise_epsilon
        noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
        top_values, topk_index = noisy.topk(self.top_k, dim=-1)
        topk_weights = torch.softmax(top_values, dim=-1)
        load_probs = noisy_topk_load_probs(clean, noisy, noise_std, self.top_k)
        return _token_choice(topk_index, topk_weights, noisy, torch.softmax(noisy, dim=-1), load_probs=load_probs)


class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: each expert takes its top-C tokens by softmax score, C = ceil(T * c / E).

    A token may get 0..E experts. The choice is made over all T tokens of the batch, so a token's
    output depends on other tokens, future ones included: it leaks the future in a causal LM.
    """

    mixes_tokens = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.weight = _gate_weight(self.num_experts, config.hidden_size)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of `num_tokens`."""
        assert self.config.capacity_factor is not None
        factor = min(self.config.capacity_factor, self.num_experts)  # a larger factor takes every token anyway
        return min(num_tokens, math.ceil(num_tokens * factor / self.num_experts))

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        capacity = self.capacity(x.shape[0])
        values, tokens = probs.topk(capacity, dim=0)  # [C, E]
        expert_index = torch.arange(self.num_experts, device=x.device).repeat_interleave(capacity)
        return Routing(tokens.t().reshape(-1), expert_index, values.t().reshape(-1), logits, probs, None)


class HierarchicalRouter(Router):
    """Shazeer et al. 2017 (appendix B) two-level MoE: a gate over `n_group` groups keeps
    `topk_group` of them, then a gate inside each chosen group keeps k / topk_group experts.

    Weight of expert j of group i = G_primary(x)_i * G_i(x)_j, each a softmax over its kept logits.
    `probs` (for balancing) is the joint softmax(primary)_i * softmax_within_group(secondary)_j;
    `logits` are primary_i + log_softmax_within_group(secondary)_j, so their logsumexp (z-loss) is
    the primary gate's.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.experts_per_group = self.num_experts // self.n_group
        self.top_k_inner = self.top_k // self.topk_group
        self.primary_weight = _gate_weight(self.n_group, config.hidden_size)
        self.weight = _gate_weight(self.num_experts, config.hidden_size)  # secondary gates, group-major

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:
        num_tokens = x.shape[0]
        primary = F.linear(x, self.primary_weight).float()  # [T, G]
        secondary = F.linear(x, self.weight).float().view(num_tokens, self.n_group, self.experts_per_group)
        group_values, group_index = primary.topk(self.topk_group, dim=-1)  # [T, kg]
        group_weights = torch.softmax(group_values, dim=-1)
        chosen = secondary.gather(1, group_index.unsqueeze(-1).expand(-1, -1, self.experts_per_group))
        inner_values, inner_index = chosen.topk(self.top_k_inner, dim=-1)  # [T, kg, ki]
        weights = group_weights.unsqueeze(-1) * torch.softmax(inner_values, dim=-1)
        expert = group_index.unsqueeze(-1) * self.experts_per_group + inner_index
        probs = torch.softmax(primary, dim=-1).unsqueeze(-1) * torch.softmax(secondary, dim=-1)
        logits = primary.unsqueeze(-1) + torch.log_softmax(secondary, dim=-1)
        k, num_experts = self.top_k, self.num_experts
        return _token_choice(expert.reshape(num_tokens, k), weights.reshape(num_tokens, k),
                             logits.reshape(num_tokens, num_experts), probs.reshape(num_tokens, num_experts))


class SoftRouter(Router):
    """Soft MoE (Puigcerver et al. 2023): E * slots slots, each a weighted average of a sequence's tokens.

    logits = x Phi (Phi: one learned vector per slot); dispatch = softmax over the tokens of each
    sequence (per slot), combine = softmax over slots (per token). Nothing is dropped and every
    expert gets the same number of slots; a token's output mixes its whole sequence, future included.
    """

    mixes_tokens = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.slots_per_expert = config.slots_per_expert
        self.num_slots = self.num_experts * self.slots_per_expert
        self.weight = nn.Parameter(torch.randn(self.num_slots, config.hidden_size) / math.sqrt(config.hidden_size))

    def forward(self, x: Tensor, seq_ids: Tensor, num_sequences: int) -> Routing:
        num_tokens, num_slots = x.shape[0], self.num_slots
        logits = F.linear(x, self.weight).float()  # [T, S]
        # dispatch: softmax over the tokens of each sequence, for each slot
        seq_max = logits.new_full((num_sequences, num_slots), float("-inf"))
        seq_max = seq_max.scatter_reduce(0, seq_ids.unsqueeze(-1).expand(-1, num_slots), logits, "amax")
        exp = torch.exp(logits - seq_max[seq_ids])
        seq_sum = logits.new_zeros(num_sequences, num_slots).index_add(0, seq_ids, exp)
        dispatch = exp / seq_sum[seq_ids]
        combine = torch.softmax(logits, dim=-1)
        # place each token's weights in its own sequence's block of slots: [T, B * S]
        rows = torch.arange(num_tokens, device=x.device)
        full_dispatch = logits.new_zeros(num_tokens, num_sequences, num_slots)
        full_combine = logits.new_zeros(num_tokens, num_sequences, num_slots)
        full_dispatch[rows, seq_ids] = dispatch
        full_combine[rows, seq_ids] = combine
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return Routing(empty, empty, logits.new_zeros(0), logits, None, None,
                       soft_dispatch=full_dispatch.view(num_tokens, num_sequences * num_slots),
                       soft_combine=full_combine.view(num_tokens, num_sequences * num_slots))


ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "deepseek_v3": DeepSeekV3Router,
    "soft": SoftRouter,
    "hierarchical": HierarchicalRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router class named by `config.router`."""
    return ROUTERS[config.router](config)
