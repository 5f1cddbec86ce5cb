"""Qwen2 (`Qwen2ForCausalLM`): Llama with q/k/v biases (no o_proj bias) and sliding windows from layer
`max_window_layers` on when `use_sliding_window` (or as `layer_types` says)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family
from .config_io import HFConfig, layer_types_of, read_common, read_layer_types, read_rope, write_common, write_rope
from .problems import attention_problems, dense_problems


def read_qwen_windows(f: HFConfig, layers: int) -> dict[str, Any]:
    """Qwen2/Qwen3's windows: sliding from layer `max_window_layers` on, when `use_sliding_window`."""
    if not f.flag("use_sliding_window"):
        types = f.values.get("layer_types")
        if types and "sliding_attention" in types:
            raise ValueError(f"{f.where}: layer_types has sliding_attention layers but use_sliding_window is false; "
                             "transformers gives them no window")
        return {}
    first = f.integer("max_window_layers")
    return read_layer_types(f, layers, lambda i: i >= first)


def write_qwen_windows(config: ModelConfig) -> dict[str, Any]:
    types = layer_types_of(config)
    return {"use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
            "max_window_layers": config.num_hidden_layers, "layer_types": types}


class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    is_moe = False
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
    expert_files = None

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        return ModelConfig(**common, **read_rope(f), **read_qwen_windows(f, common["num_hidden_layers"]),
                           qkv_bias=True)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {**write_common(config), **write_rope(config), **write_qwen_windows(config)}

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "Qwen2", qkv_bias=True, windows="per_layer")
        if not config.qkv_bias:
            problems.append("Qwen2 attention always has q/k/v biases (this model: qkv_bias=False)")
        return problems + dense_problems(config, "Qwen2")


FAMILY = Qwen2()
