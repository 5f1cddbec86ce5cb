"""GPT-OSS (`GptOssForCausalLM`): an MoE FFN in every layer with biased routers and experts, GPT-OSS's clamped
SwiGLU, attention sinks, and sliding-window attention in alternate layers (`layer_types`).

- Router: logits = x W^T + b, the top-k logits kept and softmaxed, which is moekit's softmax top-k renormalised
  (`router_bias=True`, `norm_topk_prob=True`).
- Experts: ``gate_up_proj [E, H, 2I]`` stored transposed with gate and up interleaved (gate columns 0, 2, 4..., up
  columns 1, 3, 5...), ``down_proj [E, I, H]`` transposed, biases ``gate_up_proj_bias`` (interleaved) and
  ``down_proj_bias``; moekit holds them as ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``.
  Activation: (clamp(up, -L, L) + 1) * g * sigmoid(alpha g), g = clamp(gate, max=L) (`hidden_act="clamped_swiglu"`,
  `swiglu_limit`, `swiglu_alpha`).
- Attention: biases on q, k, v and o (`attention_bias`), one learned sink logit per head (`sinks`), YaRN RoPE by
  default, `head_dim` 64 by default. Checkpoints store the experts fused (no per-expert files).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig, MoEConfig
from .base import Transform
from .config_io import HFConfig, layer_types_of, read_common, read_layer_types, read_rope, write_common, write_rope
from .moe_common import SoftmaxMoE, block_expert_dims
from .problems import attention_problems, moe_problems

#: the RoPE transformers' GptOssConfig uses when a config.json gives none
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def _interleave(gate_first: Tensor, dim: int) -> Tensor:
    """[..., 2I, ...] gate rows then up rows -> gate and up alternating along `dim`."""
    gate, up = gate_first.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _deinterleave(alternating: Tensor, dim: int) -> Tensor:
    """Gate and up alternating along `dim` -> gate rows, then up rows."""
    index = torch.arange(alternating.shape[dim], device=alternating.device)
    return torch.cat([alternating.index_select(dim, index[0::2]), alternating.index_select(dim, index[1::2])], dim=dim)


TRANSFORMS = {
    # moekit [E, 2I, H] gate-first <-> [E, H, 2I] interleaved
    "experts.gate_up_proj": Transform(to_moekit=lambda t: _deinterleave(t.transpose(1, 2), 1),
                                      to_hf=lambda t: _interleave(t, 1).transpose(1, 2)),
    "experts.gate_up_proj_bias": Transform(to_moekit=lambda t: _deinterleave(t, 1), to_hf=lambda t: _interleave(t, 1)),
    # moekit [E, H, I] <-> [E, I, H]
    "experts.down_proj": Transform(to_moekit=lambda t: t.transpose(1, 2), to_hf=lambda t: t.transpose(1, 2)),
}


class GptOss(SoftmaxMoE):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    defaults = {"rope_theta": 150000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "head_dim": 64,
                "num_key_value_heads": 8, "sliding_window": 128, "num_local_experts": 128, "num_experts_per_tok": 4,
                "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": True, "router_aux_loss_coef": 0.001}
    block_names = {"router.weight": "router.weight", "router.bias": "router.bias",
                   "experts.gate_up_proj": "experts.gate_up_proj",
                   "experts.gate_up_proj_bias": "experts.gate_up_proj_bias",
                   "experts.down_proj": "experts.down_proj", "experts.down_proj_bias": "experts.down_proj_bias"}
    block_transforms = TRANSFORMS
    expert_files = None
    block_classes = ("transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        values = dict(hf)
        if not values.get("rope_parameters") and not values.get("rope_scaling"):
            values["rope_parameters"] = dict(DEFAULT_ROPE)
        values["hidden_act"] = "silu"  # transformers' GPT-OSS experts ignore hidden_act (their activation is fixed)
        f = HFConfig(values, self, where)
        common = read_common(f)
        layers = common["num_hidden_layers"]
        bias = f.flag("attention_bias", True)
        moe = MoEConfig(hidden_size=common["hidden_size"], moe_intermediate_size=common["intermediate_size"],
                        num_local_experts=f.integer("num_local_experts", 1),
                        num_experts_per_tok=f.integer("num_experts_per_tok", 1), router="topk", norm_topk_prob=True,
                        router_bias=True, expert_bias=True, hidden_act="clamped_swiglu",
                        swiglu_limit=f.number("swiglu_limit"), swiglu_alpha=f.number("swiglu_alpha"))
        windows = read_layer_types(f, layers, lambda i: bool((i + 1) % 2))
        return ModelConfig(**common, **read_rope(f), **windows, qkv_bias=bias, o_proj_bias=bias,
                           attention_sinks=True, moe=moe)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        assert moe is not None
        return {**write_common(config), **write_rope(config), "attention_bias": config.qkv_bias,
                "layer_types": layer_types_of(config), "sliding_window": config.sliding_window,
                "intermediate_size": moe.moe_intermediate_size, "num_local_experts": moe.num_local_experts,
                "num_experts_per_tok": moe.num_experts_per_tok, "swiglu_limit": moe.swiglu_limit,
                "swiglu_alpha": moe.swiglu_alpha, "router_aux_loss_coef": moe.router_aux_loss_coef,
                "output_router_logits": False}

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "GPT-OSS", qkv_bias=True, o_proj_bias=True, tied_biases=True,
                                      windows="per_layer", sinks=True)
        if not config.attention_sinks:
            problems.append("GPT-OSS attention always has sinks (this model: attention_sinks=False)")
        problems += moe_problems(config, "GPT-OSS", norm_topk_prob=True, router_bias=True, expert_bias=True,
                                 activation="clamped_swiglu", every_layer=True)
        moe = config.moe
        if moe is not None:
            for name, value in (("router_bias", moe.router_bias), ("expert_bias", moe.expert_bias)):
                if not value:
                    problems.append(f"GPT-OSS's routers and experts always have biases (this model: {name}=False)")
            if moe.n_shared_experts:
                problems.append("GPT-OSS has no shared experts")
        return problems

    def block_config(self, block: nn.Module) -> MoEConfig:
        experts, hidden, inner = block_expert_dims(block, transposed=True)
        return MoEConfig(hidden_size=hidden, moe_intermediate_size=inner, num_local_experts=experts,
                         num_experts_per_tok=int(block.router.top_k), router="topk", norm_topk_prob=True,
                         router_bias=True, expert_bias=True, hidden_act="clamped_swiglu",
                         swiglu_limit=float(block.experts.limit), swiglu_alpha=float(block.experts.alpha))


FAMILY = GptOss()
