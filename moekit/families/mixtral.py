"""Mixtral (`MixtralForCausalLM`): an MoE FFN in every layer, softmax top-k always renormalised, Mistral attention.

Checkpoints store each expert as ``block_sparse_moe.experts.{e}.w1 / w3 / w2`` (gate, up, down) beside the router
``block_sparse_moe.gate``; transformers 5 fuses them into ``mlp.experts.gate_up_proj`` / ``down_proj`` in memory.
`intermediate_size` is one expert's width. `router_jitter_noise` multiplies the router's input only in moekit (as
Switch defines it) and the experts' input too in transformers: the two agree in eval mode.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ModelConfig, MoEConfig
from .base import ExpertFiles
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .mistral import read_window, write_window
from .moe_common import SoftmaxMoE, block_expert_dims, experts_activation, silu_act
from .problems import attention_problems, moe_problems


class Mixtral(SoftmaxMoE):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    defaults = {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
                "num_key_value_heads": 8, "num_experts_per_tok": 2, "num_local_experts": 8, "router_jitter_noise": 0.0,
                "router_aux_loss_coef": 0.001}
    block_names = {"router.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
                   "experts.down_proj": "experts.down_proj"}
    expert_files = ExpertFiles(block="block_sparse_moe", gate="w1", up="w3", down="w2")
    block_classes = ("transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        moe = MoEConfig(hidden_size=common["hidden_size"], moe_intermediate_size=common["intermediate_size"],
                        num_local_experts=f.integer("num_local_experts", 1),
                        num_experts_per_tok=f.integer("num_experts_per_tok", 1), router="topk", norm_topk_prob=True,
                        router_jitter_noise=f.number("router_jitter_noise"))
        return ModelConfig(**common, **read_rope(f), **read_window(f), moe=moe)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        assert moe is not None
        return {**write_common(config), **write_rope(config), **write_window(config),
                "intermediate_size": moe.moe_intermediate_size, "num_local_experts": moe.num_local_experts,
                "num_experts_per_tok": moe.num_experts_per_tok, "router_jitter_noise": moe.router_jitter_noise,
                "router_aux_loss_coef": moe.router_aux_loss_coef, "output_router_logits": False}

    def problems(self, config: ModelConfig) -> list[str]:
        return (attention_problems(config, "Mixtral", windows="all")
                + moe_problems(config, "Mixtral", norm_topk_prob=True, every_layer=True))

    def block_config(self, block: nn.Module) -> MoEConfig:
        experts, hidden, inner = block_expert_dims(block, per_expert="w1")
        silu_act(experts_activation(block.experts), "expert")
        top_k = getattr(block.gate, "top_k", None) or block.top_k  # transformers 5 routes with the gate's top_k
        return MoEConfig(hidden_size=hidden, moe_intermediate_size=inner, num_local_experts=experts,
                         num_experts_per_tok=int(top_k), router="topk", norm_topk_prob=True,
                         router_jitter_noise=float(getattr(block, "jitter_noise", 0.0)))


FAMILY = Mixtral()
