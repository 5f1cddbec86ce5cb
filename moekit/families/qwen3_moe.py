"""Qwen3-MoE (`Qwen3MoeForCausalLM`): softmax top-k (`norm_topk_prob` true or false), no shared expert, dense layers
by `decoder_sparse_step` / `mlp_only_layers`, Qwen3 attention (per-head q/k RMSNorm, `attention_bias` on q, k, v
and o) with one sliding window for every layer when `use_sliding_window`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ModelConfig, MoEConfig
from .config_io import HFConfig, layer_pattern, read_common, read_rope, write_common, write_rope
from .llama import read_tied_bias
from .moe_common import SoftmaxMoE, block_expert_dims, experts_activation, silu_act
from .problems import moe_problems
from .qwen2_moe import qwen_moe_layers, write_qwen_moe_layers
from .qwen3 import qwen3_attention_problems

EXPERT_NAMES = {"router.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
                "experts.down_proj": "experts.down_proj"}


def softmax_block_config(block: nn.Module) -> MoEConfig:
    """The routing of a block whose `gate` is a softmax top-k router with `top_k` and `norm_topk_prob` (Qwen3-MoE,
    OLMoE)."""
    experts, hidden, inner = block_expert_dims(block)
    silu_act(experts_activation(block.experts), "expert")
    return MoEConfig(hidden_size=hidden, moe_intermediate_size=inner, num_local_experts=experts,
                     num_experts_per_tok=int(block.gate.top_k), router="topk",
                     norm_topk_prob=bool(block.gate.norm_topk_prob))


class Qwen3Moe(SoftmaxMoE):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "num_key_value_heads": 4, "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128,
                "norm_topk_prob": False, "router_aux_loss_coef": 0.001}
    block_names = EXPERT_NAMES
    block_classes = ("transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        fields = {**common, **read_rope(f), **read_tied_bias(f), "qk_norm": "head"}
        if f.flag("use_sliding_window"):
            window = f.integer("sliding_window", 1)
            if window < common["max_position_embeddings"]:
                fields["sliding_window"] = window
        is_moe = qwen_moe_layers(f, common["num_hidden_layers"])
        if not any(is_moe):
            return ModelConfig(**fields)
        moe = MoEConfig(hidden_size=common["hidden_size"], moe_intermediate_size=f.integer("moe_intermediate_size", 1),
                        num_local_experts=f.integer("num_experts", 1),
                        num_experts_per_tok=f.integer("num_experts_per_tok", 1), router="topk",
                        norm_topk_prob=f.flag("norm_topk_prob"))
        return ModelConfig(**fields, **layer_pattern(is_moe), moe=moe)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        out = {**write_common(config), **write_rope(config), "attention_bias": config.qkv_bias,
               "use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
               **write_qwen_moe_layers(config)}
        if moe is None:
            return {**out, "num_experts": 0}
        return {**out, "num_experts": moe.num_local_experts, "num_experts_per_tok": moe.num_experts_per_tok,
                "moe_intermediate_size": moe.moe_intermediate_size, "norm_topk_prob": moe.resolved_norm_topk_prob,
                "router_aux_loss_coef": moe.router_aux_loss_coef, "output_router_logits": False}

    def problems(self, config: ModelConfig) -> list[str]:
        return qwen3_attention_problems(config, "Qwen3-MoE", windows="all") + moe_problems(config, "Qwen3-MoE")

    def block_config(self, block: nn.Module) -> MoEConfig:
        return softmax_block_config(block)


FAMILY = Qwen3Moe()
