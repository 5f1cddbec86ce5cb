"""GLM-4.5 (`Glm4MoeForCausalLM`): DeepSeek-V3's MoE (`moekit.families.deepseek_v3.DeepSeekMoE`) with standard
grouped-query attention: q/k/v biases with `attention_bias`, an optional per-head q/k RMSNorm (`use_qk_norm`), and
RoPE on the first `partial_rotary_factor` of each head (0.5 by default). It is where moekit writes DeepSeek-style
models that have standard attention (`tiny-deepseek`, DeepSeek-style merges and upcycles)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .config_io import HFConfig, read_common, read_rope, write_common, write_rope
from .deepseek_v3 import DeepSeekMoE
from .problems import attention_problems


class Glm4Moe(DeepSeekMoE):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    aliases = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                "num_key_value_heads": 8, "attention_bias": False, "moe_intermediate_size": 1408,
                "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
                "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                "use_qk_norm": False}
    block_classes = ("transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeMoE",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        f = HFConfig(hf, self, where)
        common = read_common(f)
        return ModelConfig(**common, **read_rope(f, partial_default=0.5), qkv_bias=f.flag("attention_bias"),
                           qk_norm="head" if f.flag("use_qk_norm") else None,
                           **self.read_moe(f, common["hidden_size"], common["num_hidden_layers"]))

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        return {**write_common(config), **write_rope(config, partial=True), **self.write_moe(config),
                "attention_bias": config.qkv_bias, "use_qk_norm": config.qk_norm == "head"}

    def problems(self, config: ModelConfig) -> list[str]:
        return (attention_problems(config, "Glm4-MoE", qkv_bias=True, qk_norm=("head",), partial_rotary=True)
                + self.moe_problems(config, "Glm4-MoE"))


FAMILY = Glm4Moe()
