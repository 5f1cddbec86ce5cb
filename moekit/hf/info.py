"""`moekit info` for a model moekit does not convert: counted on transformers' own class, built on the meta device."""

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


def info_from_transformers(hf_config: dict[str, Any], context: int = 4096, batch: int = 1,
                           dtype_bytes: float = 2):
    """Parameters (total and per token) and weight memory of transformers' own class for `hf_config`.

    The model is built on the meta device (no memory, no weights). Active parameters leave out E - k experts of
    every experts module; FLOPs are 2 x the active matmul weights (attention scores and the KV cache are not
    computed for a family moekit does not model: the notes say so).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..info import TRAINING_BYTES_PER_PARAM, ModelInfo

    values = dict(hf_config)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    k = experts_per_token(text)
    total = sum(p.numel() for p in model.parameters())
    inactive, moe_layers = 0, 0
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if name.rsplit(".", 1)[-1] != "experts" or not isinstance(experts, int) or k is None:
            continue
        moe_layers += 1
        per_expert = parameters_per_expert(module, experts)
        inactive += per_expert * (experts - min(k, experts))
    active = total - inactive
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    matmul = active - embeddings
    notes = [f"counted on transformers' own {type(model).__name__} (moekit does not convert {model_type}); "
             "attention-score FLOPs and the KV cache are not computed"]
    if k is None:
        notes.append("the config names no experts-per-token field moekit knows: active = total")
    weights = round(total * dtype_bytes)
    return ModelInfo(total_params=total, active_params=active, flops_per_token_forward=2 * matmul,
                     train_flops_per_token=6 * matmul, memory_inference_bytes=weights,
                     memory_training_bytes=TRAINING_BYTES_PER_PARAM * total, name=str(model_type),
                     num_layers=int(getattr(text, "num_hidden_layers", 0) or 0), num_moe_layers=moe_layers,
                     active_matmul_params=matmul, weights_bytes=weights, context=context, batch=batch,
                     dtype_bytes=dtype_bytes, notes=notes)
