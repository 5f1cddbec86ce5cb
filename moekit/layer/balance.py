"""Load-balancing losses and the auxiliary-loss-free bias balancer.

Every loss here is the *unweighted* term; `MoELayer` multiplies each by its `MoEConfig`
coefficient and sums them into `MoEOutput.aux_loss`. Normalisations, since libraries differ:

- `switch_aux_loss` = E * sum_i f_i * P_i with f_i = (assignments to i) / (all assignments) and
  P_i = mean router probability of i. It is 1 at perfect balance for every k (Switch, Megatron-Core).
  transformers' Mixtral `load_balancing_loss_func` divides by tokens, not assignments, so its value
  is k times ours (2 at perfect balance for Mixtral).
- `importance_loss` and `load_loss` = CV^2 (population variance / mean^2), 0 at perfect balance
  (Shazeer et al. 2017).
- `router_z_loss` = mean over tokens of logsumexp(logits)^2 (ST-MoE).
- `seq_aux_loss` = mean over sequences of sum_i f_i P_i with f_i = E / (k T_seq) * count_i and
  P_i = mean_t s'_{t,i} (DeepSeek-V3, scores normalised per token); 1 at perfect balance.

All of them see only the tokens that were routed: `MoELayer` removes padding before routing, so
padded tokens count in no term.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-10


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance / mean^2 (0 for fewer than 2 values)."""
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    mean = values.mean()
    return values.var(correction=0) / (mean * mean + _EPS)


def tokens_per_expert(expert_index: Tensor, num_experts: int) -> Tensor:
    """Float count of assignments per expert, shape [E]."""
    return torch.bincount(expert_index, minlength=num_experts).float()


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max load - mean load) / mean load; 0 for an empty batch."""
    load = load.float()
    mean = load.mean()
    if load.numel() == 0 or mean <= 0:
        return load.new_zeros(())
    return (load.max() - mean) / mean


def switch_aux_loss(probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard balance loss E * sum_i f_i P_i, generalised to top-k (1 at perfect balance).

    probs: [T, E] per-token distribution over experts; expert_index: [N] every (pre-drop) assignment.
    """
    if probs.shape[0] == 0 or expert_index.numel() == 0:
        return probs.new_zeros((), dtype=torch.float32)
    fraction = tokens_per_expert(expert_index, num_experts) / expert_index.numel()
    mean_prob = probs.float().mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def importance_loss(expert_index: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """Shazeer's importance loss CV(Importance)^2, Importance_i = sum_t G(x_t)_i."""
    importance = weights.new_zeros(num_experts, dtype=torch.float32).index_add(0, expert_index, weights.float())
    return cv_squared(importance)


def noisy_topk_load_probs(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer's smooth estimate P(x, i) that expert i is in the top-k under fresh noise, shape [T, E].

    P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i) where kth_excluding is the k-th
    largest noisy logit among the other experts: the (k+1)-th of H if i is itself in the top-k of H,
    else the k-th. With k = E every expert is always chosen and P = 1.
    """
    num_experts = clean_logits.shape[-1]
    if k >= num_experts:
        return torch.ones_like(clean_logits, dtype=torch.float32)
    top_values = noisy_logits.float().topk(k + 1, dim=-1).values  # [T, k+1]
    threshold_if_in = top_values[:, k : k + 1]  # (k+1)-th largest
    threshold_if_out = top_values[:, k - 1 : k]  # k-th largest
    is_in = noisy_logits.float() > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    std = noise_std.float()
    prob_if_in = normal.cdf((clean_logits.float() - threshold_if_in) / std)
    prob_if_out = normal.cdf((clean_logits.float() - threshold_if_out) / std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def load_loss(load_probs: Tensor) -> Tensor:
    """Shazeer's load loss CV(Load)^2 with Load_i = sum_t P(x_t, i)."""
    return cv_squared(load_probs.float().sum(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t (logsumexp_i logits_{t,i})^2."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def seq_aux_loss(
    probs: Tensor,
    token_index: Tensor,
    expert_index: Tensor,
    seq_ids: Tensor,
    num_sequences: int,
    num_experts_per_tok: int,
) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences that have tokens.

    probs: [T, E] normalised scores s'; token_index/expert_index: [N] assignments; seq_ids: [T].
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros((), dtype=torch.float32)
    tokens_in_seq = torch.bincount(seq_ids, minlength=num_sequences).float()  # [B]
    counts = torch.zeros(num_sequences * num_experts, device=probs.device)
    ones = torch.ones_like(expert_index, dtype=counts.dtype)
    counts.index_add_(0, seq_ids[token_index] * num_experts + expert_index, ones)
    counts = counts.view(num_sequences, num_experts)
    prob_sum = probs.new_zeros(num_sequences, num_experts, dtype=torch.float32).index_add(0, seq_ids, probs.float())
    present = tokens_in_seq > 0
    t = tokens_in_seq[present].unsqueeze(-1)
    fraction = counts[present] * num_experts / (num_experts_per_tok * t)
    mean_prob = prob_sum[present] / t
    return (fraction * mean_prob).sum(dim=-1).mean()


@torch.no_grad()
def aux_free_bias_update(bias: Tensor, load: Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (Wang et al. 2024): b_i += rate * sign(mean load - load_i), in place.

    Overloaded experts get a lower bias and so are picked less often; the bias never weights outputs.
    """
    load = load.to(bias.device, torch.float32)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))
