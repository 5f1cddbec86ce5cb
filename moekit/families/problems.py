"""What a family cannot hold of a moekit config, in words naming the feature (export and merge refuse with these)."""

from __future__ import annotations

from ..config import ModelConfig, MoEConfig
from .config_io import moe_layers

_UNEXPORTABLE_ROUTERS = {
    "noisy_topk": "noisy top-k gating with a learned noise projection (in eval mode it computes a renormalised "
                  "softmax top-k: for inference only, copy router.weight into a router='topk' model)",
    "expert_choice": "expert-choice routing, where each expert picks its tokens across the batch",
    "soft": "Soft MoE, whose expert slots average the tokens of a sequence",
    "hierarchical": "two-level gating, a softmax over groups times a softmax inside each chosen group",
}


def universal_problems(moe: MoEConfig) -> list[str]:
    """What no transformers architecture computes, whatever the family."""
    problems = []
    if moe.router in _UNEXPORTABLE_ROUTERS:
        problems.append(f"router={moe.router!r} ({_UNEXPORTABLE_ROUTERS[moe.router]}) cannot be exported: no "
                        "transformers architecture computes it, so no Hugging Face checkpoint would reproduce this "
                        "model's outputs; the routers that export are 'topk', 'switch' and 'deepseek_v3'")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} drops the tokens over an expert's capacity, which no "
                        "transformers architecture computes; export a dropless model (capacity_factor=None)")
    if moe.max_devices_per_token is not None and moe.max_devices_per_token < moe.expert_devices:
        problems.append(f"max_devices_per_token={moe.max_devices_per_token} (device-limited routing over "
                        f"expert_devices={moe.expert_devices} blocks) changes which experts a token gets, and no "
                        "transformers architecture computes it")
    if moe.hidden_act == "gelu":
        problems.append("hidden_act='gelu' experts (a plain GELU FFN) have no transformers MoE counterpart")
    return problems


def attention_problems(config: ModelConfig, name: str, *, qkv_bias: bool = False, o_proj_bias: bool = False,
                       qk_norm: tuple[str, ...] = (), clip_qkv: bool = False, partial_rotary: bool = False,
                       rope_interleave: bool = False, windows: str = "none", sinks: bool = False,
                       head_dim: bool = True, mla: bool = False, tied_biases: bool = False) -> list[str]:
    """What `name`'s attention cannot hold of `config` (each flag: the family has that feature).

    `windows`: "none", "all" (one window for every layer) or "per_layer" (layer_types). `tied_biases`: the family
    has one attention_bias flag for q, k, v and o together (Llama, Qwen3, OLMoE, GPT-OSS).
    """
    problems = []
    if config.mla is not None and not mla:
        problems.append(f"{name} has standard attention, this model multi-head latent attention (mla)")
    if config.mla is None and mla:
        problems.append(f"{name} has multi-head latent attention (MLA: keys and values come from an RMS-normalised "
                        "low-rank latent and one rotary key is shared by all heads), which this model's standard "
                        "attention cannot be written into exactly")
    if config.qkv_bias and not qkv_bias:
        problems.append(f"this model's attention has q/k/v biases, which {name} attention lacks")
    if config.o_proj_bias and not o_proj_bias:
        problems.append(f"this model's attention has an o_proj bias, which {name} attention lacks")
    if tied_biases and config.qkv_bias != config.o_proj_bias:
        problems.append(f"{name}'s attention_bias puts biases on q, k, v and o together (this model: qkv_bias="
                        f"{config.qkv_bias}, o_proj_bias={config.o_proj_bias})")
    if config.qk_norm is not None and config.qk_norm not in qk_norm:
        kind = "per head" if config.qk_norm == "head" else "over the whole projections"
        problems.append(f"this model normalises queries and keys {kind} (q_norm/k_norm, qk_norm={config.qk_norm!r}), "
                        f"which {name} attention lacks")
    if config.clip_qkv is not None and not clip_qkv:
        problems.append(f"{name} attention does not clamp q/k/v (this model: clip_qkv={config.clip_qkv})")
    if config.partial_rotary_factor != 1.0 and not partial_rotary:
        problems.append(f"{name} rotates whole heads (this model: partial_rotary_factor="
                        f"{config.partial_rotary_factor})")
    if config.rope_interleave and not rope_interleave:
        problems.append(f"{name} has no interleaved RoPE (this model: rope_interleave=True)")
    if config.attention_sinks and not sinks:
        problems.append(f"{name} attention has no sinks (this model: attention_sinks=True)")
    if config.head_dim is not None and not head_dim:
        problems.append(f"{name} derives head_dim from hidden_size / num_attention_heads (this model: head_dim="
                        f"{config.head_dim})")
    if config.sliding_window is not None:
        per_layer = config.layer_types is not None and len(set(config.layer_types)) > 1
        if windows == "none":
            problems.append(f"{name} has no sliding-window attention (this model: sliding_window="
                            f"{config.sliding_window})")
        elif windows == "all" and per_layer:
            problems.append(f"{name}'s sliding window applies to every layer (this model's layer_types mix full and "
                            "sliding attention)")
    return problems


def dense_problems(config: ModelConfig, name: str) -> list[str]:
    """A dense family holds no MoE layer."""
    if config.moe is not None and any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        return [f"{name} has no experts, and this model has MoE layers"]
    return []


def moe_problems(config: ModelConfig, name: str, *, scoring: str = "softmax", norm_topk_prob: bool | None = None,
                 shared: str = "none", groups: bool = False, router_bias: bool = False, expert_bias: bool = False,
                 activation: str = "silu", selection_bias: bool = False, scaling: bool = True,
                 every_layer: bool = False, first_dense: bool = False) -> list[str]:
    """What `name`'s MoE cannot hold of `config`'s.

    `norm_topk_prob`: the family's fixed value, or None when configurable; `shared`: "none", "plain" (always on,
    no gate) or "gated" (a sigmoid gate, Qwen2-MoE; an ungated expert is written with a zero gate); `scaling`:
    routed_scaling_factor is expressible (natively, or folded into the experts for softmax scores);
    `every_layer` / `first_dense`: the family's MoE layers are all layers / all after the first dense ones.
    """
    moe = config.moe
    layers = moe_layers(config)
    if moe is None or not layers:
        return [f"{name} is an MoE architecture and this model is dense"]
    problems = universal_problems(moe)
    if moe.scoring_func != scoring:
        problems.append(f"{name} scores experts with a {scoring}, this model with scoring_func={moe.scoring_func!r}")
    if norm_topk_prob is not None and moe.resolved_norm_topk_prob != norm_topk_prob:
        problems.append(f"{name} {'always' if norm_topk_prob else 'never'} renormalises the top-k weights, this "
                        f"model has norm_topk_prob={moe.resolved_norm_topk_prob}")
    if moe.n_shared_experts and shared == "none":
        problems.append(f"{name} has no shared experts")
    if moe.shared_expert_gate and shared != "gated":
        problems.append(f"{name} adds its shared experts without a gate (this model: shared_expert_gate=True)")
    if not groups and moe.router == "deepseek_v3" and moe.n_group > 1 and moe.topk_group < moe.n_group \
            and moe.num_local_experts // moe.n_group >= 2:
        problems.append(f"{name} has no group-limited routing (this model: n_group={moe.n_group}, topk_group="
                        f"{moe.topk_group})")
    if moe.router_bias and not router_bias:
        problems.append(f"{name}'s router has no logit bias (this model: router_bias=True)")
    if moe.expert_bias and not expert_bias:
        problems.append(f"{name}'s experts have no biases (this model: expert_bias=True)")
    if moe.hidden_act != activation and moe.hidden_act != "gelu":
        problems.append(f"{name}'s experts use {activation!r}, this model's {moe.hidden_act!r}")
    if moe.uses_aux_free_bias and not selection_bias and moe.router == "deepseek_v3":
        problems.append(f"{name} has no selection bias (e_score_correction_bias), which router='deepseek_v3' keeps")
    if moe.routed_scaling_factor != 1.0 and not scaling:
        problems.append(f"{name} has no routed_scaling_factor (this model: {moe.routed_scaling_factor})")
    if every_layer:
        dense = [i for i in range(config.num_hidden_layers) if i not in layers]
        if dense:
            problems.append(f"{name} has an MoE FFN in every layer, layers {dense} are dense")
    if first_dense and layers != list(range(config.num_hidden_layers - len(layers), config.num_hidden_layers)):
        problems.append(f"{name}'s dense layers are the first first_k_dense_replace layers, this model's MoE layers "
                        f"are {layers}")
    return problems


