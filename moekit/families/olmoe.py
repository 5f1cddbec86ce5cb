"""OLMoE (`OlmoeForCausalLM`): an MoE FFN in every layer (softmax top-k, `norm_topk_prob` false by default), and
attention whose query and key RMSNorms span the whole projection (not each head), with optional `clip_qkv`
clamping of q, k and v. `intermediate_size` is one expert's width."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ModelConfig, MoEConfig
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .llama import read_tied_bias
from .moe_common import SoftmaxMoE
from .problems import attention_problems, moe_problems
from .qwen3_moe import EXPERT_NAMES, softmax_block_config


class Olmoe(SoftmaxMoE):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    aliases = {"num_local_experts": "num_experts"}
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                "attention_bias": False, "num_experts_per_tok": 8, "num_experts": 64, "norm_topk_prob": False,
                "router_aux_loss_coef": 0.01}
    block_names = EXPERT_NAMES
    block_classes = ("transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        if "head_dim" in common:
            raise f.refuse(f"head_dim={common['head_dim']}", "OLMoE's key norm assumes hidden_size / heads")
        clip = f.get("clip_qkv")
        moe = MoEConfig(hidden_size=common["hidden_size"], moe_intermediate_size=common["intermediate_size"],
                        num_local_experts=f.integer("num_experts", 1),
                        num_experts_per_tok=f.integer("num_experts_per_tok", 1), router="topk",
                        norm_topk_prob=f.flag("norm_topk_prob"))
        return ModelConfig(**common, **read_rope(f), **read_tied_bias(f), qk_norm="projection",
                           clip_qkv=None if clip is None else f.number("clip_qkv"), moe=moe)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        assert moe is not None
        out = {**write_common(config), **write_rope(config), "attention_bias": config.qkv_bias,
               "clip_qkv": config.clip_qkv, "intermediate_size": moe.moe_intermediate_size,
               "num_experts": moe.num_local_experts, "num_experts_per_tok": moe.num_experts_per_tok,
               "norm_topk_prob": moe.resolved_norm_topk_prob, "router_aux_loss_coef": moe.router_aux_loss_coef,
               "output_router_logits": False}
        out.pop("head_dim")
        return out

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "OLMoE", qkv_bias=True, o_proj_bias=True, tied_biases=True,
                                      qk_norm=("projection",), clip_qkv=True, head_dim=False)
        if config.qk_norm != "projection":
            problems.append(f"OLMoE attention always normalises the whole query and key projections (this model: "
                            f"qk_norm={config.qk_norm!r})")
        return problems + moe_problems(config, "OLMoE", every_layer=True)

    def block_config(self, block: nn.Module) -> MoEConfig:
        return softmax_block_config(block)


FAMILY = Olmoe()
