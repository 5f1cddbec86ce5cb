"""Qwen3 (`Qwen3ForCausalLM`): Llama with an RMSNorm over each head's query and key before RoPE (`q_norm`,
`k_norm`), `head_dim` 128 by default, and Qwen2's sliding windows."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .llama import read_tied_bias
from .problems import attention_problems, dense_problems
from .qwen2 import read_qwen_windows, write_qwen_windows


def qwen3_attention_problems(config: ModelConfig, name: str, windows: str) -> list[str]:
    """What Qwen3's attention (per-head q/k norms always, `attention_bias` on q, k, v and o) cannot hold."""
    problems = attention_problems(config, name, qkv_bias=True, o_proj_bias=True, tied_biases=True,
                                  qk_norm=("head",), windows=windows)
    if config.qk_norm != "head":
        problems.append(f"{name} attention always applies q_norm/k_norm per head, which this model lacks "
                        f"(qk_norm={config.qk_norm!r})")
    return problems


class Qwen3(Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    is_moe = False
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128,
                "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
    expert_files = None

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        return ModelConfig(**common, **read_rope(f), **read_tied_bias(f), qk_norm="head",
                           **read_qwen_windows(f, common["num_hidden_layers"]))

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {**write_common(config), **write_rope(config), **write_qwen_windows(config),
                "attention_bias": config.qkv_bias}

    def problems(self, config: ModelConfig) -> list[str]:
        problems = qwen3_attention_problems(config, "Qwen3", windows="per_layer")
        return problems + dense_problems(config, "Qwen3")


FAMILY = Qwen3()
