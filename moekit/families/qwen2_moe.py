"""Qwen2-MoE (`Qwen2MoeForCausalLM`): softmax top-k (renormalised or not), one shared expert behind a sigmoid gate,
dense layers by `decoder_sparse_step` and `mlp_only_layers`, Qwen2 attention (q/k/v biases when `qkv_bias`).

The shared expert is always gated: a moekit model whose shared experts have no gate is written with a zero gate
weight (sigmoid(0) = 1/2) and a doubled `down_proj`, which computes the same function; a model without shared
experts is written with a width-0 shared expert, whose output is exactly 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig, MoEConfig
from .base import MappedSource, StateSource
from .config_io import (
    HFConfig,
    layer_pattern,
    layer_types_of,
    moe_layers,
    read_common,
    read_layer_types,
    read_rope,
    write_common,
    write_rope,
)
from .moe_common import SoftmaxMoE, block_expert_dims, experts_activation, replace_moe, silu_act, zero_width_mlp
from .problems import attention_problems, moe_problems

SHARED_NAMES = {"shared_experts.gate_proj.weight": "shared_expert.gate_proj.weight",
                "shared_experts.up_proj.weight": "shared_expert.up_proj.weight",
                "shared_experts.down_proj.weight": "shared_expert.down_proj.weight",
                "shared_experts.gate.weight": "shared_expert_gate.weight"}


def qwen_moe_layers(f: HFConfig, layers: int) -> list[bool]:
    """Qwen-MoE's MoE layers: not in `mlp_only_layers`, and (i + 1) divisible by `decoder_sparse_step`."""
    step = f.integer("decoder_sparse_step", 1)
    dense = f.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise ValueError(f"{f.where}: mlp_only_layers={dense!r} in config.json is not a list of layer indices")
    experts = f.integer("num_experts", 0)
    return [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)]


def write_qwen_moe_layers(config: ModelConfig) -> dict[str, Any]:
    """`decoder_sparse_step` 1 and every dense layer in `mlp_only_layers` (exact for any moekit layer pattern)."""
    return {"decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]}


class Qwen2Moe(SoftmaxMoE):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "num_key_value_heads": 16, "decoder_sparse_step": 1, "num_experts_per_tok": 4, "num_experts": 60,
                "norm_topk_prob": False, "qkv_bias": True, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": 28, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                "router_aux_loss_coef": 0.001}
    block_names = {"router.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
                   "experts.down_proj": "experts.down_proj", **SHARED_NAMES}
    block_classes = ("transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        layers = common["num_hidden_layers"]
        fields = {**common, **read_rope(f), "qkv_bias": f.flag("qkv_bias", True)}
        types = f.values.get("layer_types") or []
        if f.flag("use_sliding_window"):
            first = f.integer("max_window_layers")
            fields.update(read_layer_types(f, layers, lambda i: bool((i + 1) % 2) and i < first))
        elif "sliding_attention" in types:
            raise ValueError(f"{where}: layer_types has sliding_attention layers but use_sliding_window is false; "
                             "transformers gives them a window of 0")
        is_moe = qwen_moe_layers(f, layers)
        if not any(is_moe):
            return ModelConfig(**fields)
        shared = f.integer("shared_expert_intermediate_size", 0)
        moe = MoEConfig(hidden_size=common["hidden_size"], moe_intermediate_size=f.integer("moe_intermediate_size", 1),
                        num_local_experts=f.integer("num_experts", 1),
                        num_experts_per_tok=f.integer("num_experts_per_tok", 1), router="topk",
                        norm_topk_prob=f.flag("norm_topk_prob"), n_shared_experts=1 if shared else 0,
                        shared_expert_intermediate_size=shared or None, shared_expert_gate=bool(shared))
        return ModelConfig(**fields, **layer_pattern(is_moe), moe=moe)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        out = {**write_common(config), **write_rope(config), "qkv_bias": config.qkv_bias,
               "use_sliding_window": config.sliding_window is not None,
               "sliding_window": config.sliding_window, "max_window_layers": config.num_hidden_layers,
               "layer_types": layer_types_of(config), **write_qwen_moe_layers(config)}
        if moe is None:
            return {**out, "num_experts": 0}
        return {**out, "num_experts": moe.num_local_experts, "num_experts_per_tok": moe.num_experts_per_tok,
                "moe_intermediate_size": moe.moe_intermediate_size,
                "shared_expert_intermediate_size": moe.resolved_shared_intermediate_size,
                "norm_topk_prob": moe.resolved_norm_topk_prob, "router_aux_loss_coef": moe.router_aux_loss_coef,
                "output_router_logits": False}

    def problems(self, config: ModelConfig) -> list[str]:
        return (attention_problems(config, "Qwen2-MoE", qkv_bias=True, windows="per_layer")
                + moe_problems(config, "Qwen2-MoE", shared="gated"))

    # an ungated shared expert is written gated (zero gate, doubled down_proj); none at all as a width-0 one
    def export_config(self, config: ModelConfig) -> ModelConfig:
        config = super().export_config(config)
        moe = config.moe
        if moe is not None and moe.n_shared_experts:
            return replace_moe(config, n_shared_experts=1, shared_expert_gate=True,
                                shared_expert_intermediate_size=moe.resolved_shared_intermediate_size)
        return config

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        source = super().export_source(config, source)
        moe = config.moe
        if moe is None or not moe.n_shared_experts or moe.shared_expert_gate:
            return source
        hidden = config.hidden_size
        change = {f"layers.{i}.mlp.shared_experts.down_proj.weight": lambda t: t.float() * 2.0
                  for i in moe_layers(config)}
        add = {f"layers.{i}.mlp.shared_experts.gate.weight": lambda: torch.zeros(1, hidden)
               for i in moe_layers(config)}
        return MappedSource(source, change, add)

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = super().restore(stored, state)
        moe = stored.moe
        if moe is None or not moe.n_shared_experts or moe.shared_expert_gate:
            return state
        for i in moe_layers(stored):
            shared = f"layers.{i}.mlp.shared_experts"
            if bool(state.pop(f"{shared}.gate.weight").ne(0).any()):
                raise ValueError(f"layer {i}'s shared_expert_gate is nonzero but the stored model has no gate")
            down = state[f"{shared}.down_proj.weight"]
            state[f"{shared}.down_proj.weight"] = (down.float() / 2).to(down.dtype)
        return state

    def extra_tensors(self, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
        moe = config.moe
        if moe is None or moe.n_shared_experts:
            return {}
        hidden, out = config.hidden_size, {}
        for i in moe_layers(config):  # a width-0 shared expert (its gate multiplies 0)
            out.update(zero_width_mlp(f"model.layers.{i}.mlp.shared_expert", hidden))
            out[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = ((1, hidden), lambda: torch.zeros(1, hidden))
        return out

    def ignorable_tensors(self, config: ModelConfig) -> dict[str, bool]:
        moe = config.moe
        if moe is None or moe.n_shared_experts:
            return {}
        return {f"model.layers.{i}.mlp.{name}": False for i in moe_layers(config)
                for name in self.ignorable_block_tensors(moe)}

    def ignorable_block_tensors(self, moe: MoEConfig) -> dict[str, bool]:
        if moe.n_shared_experts:
            return {}
        # a width-0 shared expert adds exactly 0, whatever its gate
        return dict.fromkeys(("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                              "shared_expert.down_proj.weight", "shared_expert_gate.weight"), False)

    def block_config(self, block: nn.Module) -> MoEConfig:
        experts, hidden, inner = block_expert_dims(block)
        silu_act(experts_activation(block.experts), "expert")
        silu_act(block.shared_expert.act_fn, "shared expert")
        shared = int(block.shared_expert.gate_proj.weight.shape[0])
        return MoEConfig(hidden_size=hidden, moe_intermediate_size=inner, num_local_experts=experts,
                         num_experts_per_tok=int(block.gate.top_k), router="topk",
                         norm_topk_prob=bool(block.gate.norm_topk_prob), n_shared_experts=1 if shared else 0,
                         shared_expert_intermediate_size=shared or None, shared_expert_gate=bool(shared))


FAMILY = Qwen2Moe()
