"""When two moekit configs compute the same function: the canonical form and the comparison export and load use."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, MoEConfig
from .config_io import moe_pattern_fields

#: MoEConfig fields that change how a model trains, not what it computes in eval mode
TRAINING_MOE_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef",
                       "seq_aux_loss_coef", "aux_free_bias_update_rate", "router_jitter_noise", "expert_backend",
                       "expert_devices")


def canonical(config: ModelConfig) -> ModelConfig:
    """`config` with every choice that does not change the function written one way: Switch as top-1 without
    renormalisation, `norm_topk_prob` and the shared width resolved, the MoE layers as `layer_pattern` writes
    them, `head_dim` None when it is hidden_size / heads. Training settings are kept."""
    changes: dict[str, Any] = {**moe_pattern_fields(config), "num_key_value_heads": config.kv_heads}
    if config.head_dim is not None and config.head_dim * config.num_attention_heads == config.hidden_size:
        changes["head_dim"] = None
    if config.layer_types is not None and len(set(config.layer_types)) == 1:
        changes["layer_types"] = None
        if config.layer_types[0] == "full_attention":
            changes["sliding_window"] = None
    moe = config.moe
    if moe is not None:
        moe_changes: dict[str, Any] = {"norm_topk_prob": moe.resolved_norm_topk_prob,
                                       "shared_expert_intermediate_size": moe.resolved_shared_intermediate_size or None}
        if moe.router == "switch":
            moe_changes["router"] = "topk"
        changes["moe"] = moe.replace(**moe_changes)
    return ModelConfig(**{**config.to_dict(), **{k: v.to_dict() if isinstance(v, MoEConfig) else v
                                                 for k, v in changes.items()}})


def function_key(config: ModelConfig) -> dict[str, Any]:
    """What determines `config`'s eval-mode function, as a dict: two configs with equal keys compute the same
    function from the same weights (training settings, `initializer_range` and unused widths left out)."""
    values = canonical(config).to_dict()
    values.pop("initializer_range")
    moe = values.get("moe")
    if moe is not None:
        for name in TRAINING_MOE_FIELDS:
            moe.pop(name)
        moe["selection_bias"] = config.moe.uses_aux_free_bias if config.moe is not None else False
    if not any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        values.pop("intermediate_size")  # no dense layer uses it
    return values


def function_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields where `a` and `b` compute different functions, as "name: a vs b" texts."""
    ka, kb = function_key(a), function_key(b)
    out = []
    for key in sorted(set(ka) | set(kb)):
        if key == "moe" and isinstance(ka.get(key), dict) and isinstance(kb.get(key), dict):
            out += [f"moe.{k}: {ka[key].get(k)!r} vs {kb[key].get(k)!r}" for k in sorted(set(ka[key]) | set(kb[key]))
                    if ka[key].get(k) != kb[key].get(k)]
        elif ka.get(key) != kb.get(key):
            out.append(f"{key}: {ka.get(key)!r} vs {kb.get(key)!r}")
    return out


