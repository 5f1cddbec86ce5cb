"""Read a transformers MoE block's weights into a moekit config and state dict.

Pure tensor mapping by attribute names, so moekit's core never imports transformers. Supported:
`MixtralSparseMoeBlock` (fused 3-D experts as in transformers 5, or the older `w1/w2/w3` list),
`Qwen2MoeSparseMoeBlock` (shared expert with sigmoid gate) and `DeepseekV3MoE`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MoEConfig


def _act_name(act: nn.Module | object) -> str:
    name = type(act).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    raise ValueError(f"from_hf: expert activation {type(act).__name__} is not supported; moekit's gated experts "
                     "use SiLU (SwiGLU). Convert a model whose experts use hidden_act='silu'.")


def _experts_state(experts: nn.Module) -> tuple[dict[str, Tensor], int, int, int, str]:
    """(state, num_experts, hidden, intermediate, act) from fused or per-expert HF experts."""
    if hasattr(experts, "gate_up_proj"):
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        act = _act_name(experts.act_fn)
    elif isinstance(experts, nn.ModuleList) and hasattr(experts[0], "w1"):  # transformers 4.x Mixtral
        gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight], dim=0) for e in experts]).detach()
        down = torch.stack([e.w2.weight for e in experts]).detach()
        act = _act_name(experts[0].act_fn)
    else:
        raise ValueError(f"from_hf: cannot read experts of type {type(experts).__name__}; expected fused "
                         "gate_up_proj/down_proj tensors or a ModuleList of w1/w2/w3 experts")
    num_experts, two_i, hidden = gate_up.shape
    return ({"experts.gate_up_proj": gate_up.clone(), "experts.down_proj": down.clone()},
            num_experts, hidden, two_i // 2, act)


def _mlp_state(prefix: str, mlp: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{name}.weight": getattr(mlp, name).weight.detach().clone()
            for name in ("gate_proj", "up_proj", "down_proj")}


def config_and_state_from_hf(module: nn.Module) -> tuple[MoEConfig, dict[str, Tensor]]:
    """Map a transformers MoE block to (`MoEConfig`, state dict for `MoELayer`)."""
    kind = type(module).__name__
    gate = getattr(module, "gate", None)
    if gate is None or not hasattr(module, "experts"):
        raise ValueError(f"from_hf: {kind} is not a supported MoE block; supported: MixtralSparseMoeBlock, "
                         "Qwen2MoeSparseMoeBlock, DeepseekV3MoE")
    state, num_experts, hidden, inter, act = _experts_state(module.experts)
    gate_weight = gate.weight.detach().clone()
    state["router.weight"] = gate_weight
    top_k = int(getattr(gate, "top_k", getattr(module, "top_k", 0)))
    common = dict(hidden_size=hidden, moe_intermediate_size=inter, num_local_experts=num_experts,
                  num_experts_per_tok=top_k, hidden_act=act)

    if hasattr(module, "shared_experts") and hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3
        shared = module.shared_experts
        shared_inter = shared.gate_proj.weight.shape[0]
        state.update(_mlp_state("shared_experts", shared))
        state["router.e_score_correction_bias"] = gate.e_score_correction_bias.detach().float().clone()
        config = MoEConfig(**common, router="deepseek_v3", scoring_func="sigmoid",
                           norm_topk_prob=bool(gate.norm_topk_prob),
                           routed_scaling_factor=float(gate.routed_scaling_factor),
                           n_group=int(gate.num_group), topk_group=int(gate.topk_group),
                           n_shared_experts=max(1, shared_inter // inter),
                           shared_expert_intermediate_size=shared_inter)
    elif hasattr(module, "shared_expert"):  # Qwen2-MoE
        shared = module.shared_expert
        state.update(_mlp_state("shared_experts", shared))
        has_gate = getattr(module, "shared_expert_gate", None) is not None
        if has_gate:
            state["shared_experts.gate.weight"] = module.shared_expert_gate.weight.detach().clone()
        config = MoEConfig(**common, router="topk", norm_topk_prob=bool(getattr(gate, "norm_topk_prob", False)),
                           n_shared_experts=1, shared_expert_intermediate_size=shared.gate_proj.weight.shape[0],
                           shared_expert_gate=has_gate)
    else:  # Mixtral: softmax top-k, always renormalised
        config = MoEConfig(**common, router="topk", norm_topk_prob=True,
                           router_jitter_noise=float(getattr(module, "jitter_noise", 0.0)))
    return config, state
