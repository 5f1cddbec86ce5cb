"""Mistral (`MistralForCausalLM`): Llama without attention biases, with one sliding window for every layer."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .problems import attention_problems, dense_problems


def read_window(f: HFConfig) -> dict[str, Any]:
    """`sliding_window` for every layer (Mistral, Mixtral); None or a window past every position means none."""
    window = f.get("sliding_window")
    if window is None:
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{f.where}: sliding_window={window!r} in config.json is not None or a positive integer")
    if window >= f.integer("max_position_embeddings", 1):
        return {}  # no token is ever further back than the window: full causal attention
    return {"sliding_window": window}


def write_window(config: ModelConfig) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window}


class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    is_moe = False
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096, "num_key_value_heads": 8}
    expert_files = None

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        return ModelConfig(**read_common(f), **read_rope(f), **read_window(f))

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {**write_common(config), **write_rope(config), **write_window(config)}

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "Mistral", windows="all")
        return problems + dense_problems(config, "Mistral")


FAMILY = Mistral()
