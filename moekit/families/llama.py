"""Llama (`LlamaForCausalLM`): the dense base every other family here extends, and a merge/upcycle input.

Attention: grouped-query, `attention_bias` puts biases on q, k, v and o together; RoPE default, linear, llama3
(Llama 3.1+) or yarn scaling; `head_dim` may differ from hidden_size / heads. `mlp_bias` is refused (no MoE layout
has FFN biases).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .problems import attention_problems, dense_problems


def read_tied_bias(f: HFConfig) -> dict[str, Any]:
    """`attention_bias`: one flag for the q, k, v and o biases (Llama, Qwen3, OLMoE, GPT-OSS)."""
    bias = f.flag("attention_bias")
    return {"qkv_bias": bias, "o_proj_bias": bias}


class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    is_moe = False
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                "attention_bias": False, "mlp_bias": False}
    expert_files = None

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        if f.flag("mlp_bias"):
            raise f.refuse("mlp_bias=True", "moekit's FFNs have no biases")
        return ModelConfig(**read_common(f), **read_rope(f), **read_tied_bias(f))

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {**write_common(config), **write_rope(config), "attention_bias": config.qkv_bias, "mlp_bias": False,
                "pretraining_tp": 1}

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "Llama", qkv_bias=True, o_proj_bias=True, tied_biases=True)
        return problems + dense_problems(config, "Llama")


FAMILY = Llama()
