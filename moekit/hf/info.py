"""How many parameters an expert of a transformers MoE model has, and how many experts a token uses: what
`HFCausalLM.num_parameters(active=True)` and `moekit info` count transformers' own classes with."""

from __future__ import annotations

from typing import Any

import torch

#: where transformers configs keep the experts per token (DBRX keeps it in `ffn_config.moe_top_k`)
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_k", "top_k", "top_k_experts",
                "experts_per_token")


def experts_per_token(text_config: Any) -> int | None:
    """The experts each token uses, from the fields transformers' MoE configs use for it; None if none is set."""
    for name in TOP_K_FIELDS:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    ffn = getattr(text_config, "ffn_config", None)
    value = getattr(ffn, "moe_top_k", None)
    return value if isinstance(value, int) and value > 0 else None


def parameters_per_expert(experts: torch.nn.Module, num_experts: int) -> int:
    """One expert's parameters in a transformers experts module: every tensor in it stacks the experts (as
    [E, ...], or DBRX's [E * I, H]), so its total divided by E."""
    return sum(p.numel() for p in experts.parameters()) // num_experts
