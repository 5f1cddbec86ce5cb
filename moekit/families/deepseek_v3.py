"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention and the DeepSeek MoE, whose block GLM-4.5
(`moekit.families.glm4_moe`) shares.

The MoE (`DeepSeekMoE`, defined here once): sigmoid scores, the selection bias `e_score_correction_bias`, selection
inside the `topk_group` best of `n_group` groups (a group's score is the sum of its two best biased scores), the
kept scores renormalised (`norm_topk_prob`) and times `routed_scaling_factor`, `n_shared_experts` always-on
experts fused into one FFN of width n_shared_experts * moe_intermediate_size, and dense first
`first_k_dense_replace` layers. moekit's `router="deepseek_v3"` computes exactly that; a moekit shared width that is
not a multiple of the expert width is padded with zero units (they add exactly 0).

Attention (`ModelConfig.mla`): q from `q_proj` or `q_b_proj(q_a_layernorm(q_a_proj))`, keys and values from the
normalised latent of `kv_a_proj_with_mqa` through `kv_b_proj`, one rotary key shared by every head, RoPE on
interleaved pairs by default (`rope_interleave`), and YaRN's `mscale_all_dim` in the softmax scale. Standard
attention cannot be written into these weights exactly, so only moekit models with `mla` export here (and
DeepSeek-style merges of dense models are written as GLM-4.5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MLAConfig, ModelConfig, MoEConfig
from .base import Family, MappedSource, StateSource
from .config_io import HFConfig, moe_layers, read_common, read_rope, write_common, write_rope
from .equivalence import canonical
from .moe_common import block_expert_dims, experts_activation, replace_moe, silu_act, zero_width_mlp
from .problems import attention_problems, moe_problems

BLOCK_NAMES = {"router.weight": "gate.weight", "router.e_score_correction_bias": "gate.e_score_correction_bias",
               "experts.gate_up_proj": "experts.gate_up_proj", "experts.down_proj": "experts.down_proj",
               "shared_experts.gate_proj.weight": "shared_experts.gate_proj.weight",
               "shared_experts.up_proj.weight": "shared_experts.up_proj.weight",
               "shared_experts.down_proj.weight": "shared_experts.down_proj.weight"}
_SHARED = ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight")


class DeepSeekMoE(Family):
    """The DeepSeek MoE block's reading, writing and export (shared by DeepSeek-V3 and GLM-4.5)."""

    block_names = BLOCK_NAMES

    def read_moe(self, f: HFConfig, hidden: int, layers: int) -> dict[str, Any]:
        """ModelConfig's MoE fields: the DeepSeek MoE from layer `first_k_dense_replace` on."""
        first = f.integer("first_k_dense_replace", 0)
        if first >= layers:
            return {}
        experts = f.integer("n_routed_experts", 1)
        moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=f.integer("moe_intermediate_size", 1),
                        num_local_experts=experts, num_experts_per_tok=f.integer("num_experts_per_tok", 1),
                        router="deepseek_v3", scoring_func="sigmoid", norm_topk_prob=f.flag("norm_topk_prob", True),
                        routed_scaling_factor=f.number("routed_scaling_factor"), n_group=f.integer("n_group", 1),
                        topk_group=f.integer("topk_group", 1), n_shared_experts=f.integer("n_shared_experts", 0))
        return {"first_k_dense_replace": first, "moe": moe}

    def write_moe(self, config: ModelConfig) -> dict[str, Any]:
        moe = config.moe
        assert moe is not None
        grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
        return {"n_routed_experts": moe.num_local_experts, "num_experts_per_tok": moe.num_experts_per_tok,
                "moe_intermediate_size": moe.moe_intermediate_size,
                "n_shared_experts": moe.resolved_shared_intermediate_size // moe.moe_intermediate_size,
                "routed_scaling_factor": moe.routed_scaling_factor, "n_group": moe.n_group if grouped else 1,
                "topk_group": moe.topk_group if grouped else 1, "norm_topk_prob": moe.resolved_norm_topk_prob,
                "first_k_dense_replace": config.first_k_dense_replace, "num_nextn_predict_layers": 0,
                "num_mtp_layers": 0, "output_router_logits": False}

    def moe_problems(self, config: ModelConfig, name: str) -> list[str]:
        problems = moe_problems(config, name, scoring="sigmoid", shared="plain", groups=True, selection_bias=True,
                                first_dense=True)
        moe = config.moe
        if moe is not None:
            if moe.router not in ("deepseek_v3", "topk"):
                problems.append(f"{name}'s router is DeepSeek-V3's (sigmoid top-k), this model's {moe.router!r}")
            if moe.num_local_experts < 2:
                problems.append(f"{name}'s router needs at least 2 experts (it sums each group's two best scores)")
            grouped = moe.router == "deepseek_v3" and moe.n_group > 1 and moe.topk_group < moe.n_group
            if grouped and moe.num_local_experts // moe.n_group < 2:
                problems.append(f"{name} scores a group by its two best experts, and this model's groups hold "
                                f"{moe.num_local_experts // moe.n_group}")
        return problems

    # ------------------------------------------------------------------ export: the router as DeepSeek-V3's, the
    # shared experts padded to a whole number of experts (width 0 without any)
    def export_config(self, config: ModelConfig) -> ModelConfig:
        config = canonical(config)
        moe = config.moe
        if moe is None or not moe_layers(config):
            return config
        grouped = moe.router == "deepseek_v3" and moe.n_group > 1 and moe.topk_group < moe.n_group
        width = math.ceil(moe.resolved_shared_intermediate_size / moe.moe_intermediate_size)
        return replace_moe(config, router="deepseek_v3", n_group=moe.n_group if grouped else 1,
                            topk_group=moe.topk_group if grouped else 1, n_shared_experts=width,
                            shared_expert_intermediate_size=width * moe.moe_intermediate_size if width else None)

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        moe = config.moe
        if moe is None:
            return source
        change, add = {}, {}
        width = moe.resolved_shared_intermediate_size
        padded = math.ceil(width / moe.moe_intermediate_size) * moe.moe_intermediate_size
        for i in moe_layers(config):
            layer = f"layers.{i}.mlp"
            if not moe.uses_aux_free_bias:
                add[f"{layer}.router.e_score_correction_bias"] = lambda: torch.zeros(moe.num_local_experts)
            if width and padded != width:
                for name in _SHARED:
                    dim = 1 if name.startswith("shared_experts.down") else 0
                    change[f"{layer}.{name}"] = lambda t, dim=dim: _pad(t, dim, padded)
        return MappedSource(source, change, add) if change or add else source

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        moe = stored.moe
        if moe is None:
            return state
        state = dict(state)
        width = moe.resolved_shared_intermediate_size
        for i in moe_layers(stored):
            layer = f"layers.{i}.mlp"
            bias = f"{layer}.router.e_score_correction_bias"
            if not moe.uses_aux_free_bias and bool(state.pop(bias).ne(0).any()):
                raise ValueError(f"layer {i}'s e_score_correction_bias is nonzero but the stored router has none")
            for name in _SHARED if width else ():
                dim = 1 if name.startswith("shared_experts.down") else 0
                tensor = state[f"{layer}.{name}"]
                kept, padding = tensor.split([width, tensor.shape[dim] - width], dim=dim)
                if bool(padding.ne(0).any()):
                    raise ValueError(f"layer {i}'s shared expert padding is nonzero")
                state[f"{layer}.{name}"] = kept.contiguous()
        return state

    def extra_tensors(self, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
        moe = config.moe
        if moe is None or moe.n_shared_experts:
            return {}
        out = {}
        for i in moe_layers(config):  # transformers builds a width-0 shared MLP for n_shared_experts=0
            out.update(zero_width_mlp(f"model.layers.{i}.mlp.shared_experts", config.hidden_size))
        return out

    def ignorable_tensors(self, config: ModelConfig) -> dict[str, bool]:
        moe = config.moe
        if moe is None or moe.n_shared_experts:
            return {}
        return {f"model.layers.{i}.mlp.{name}": False for i in moe_layers(config) for name in _SHARED}

    def ignorable_block_tensors(self, moe: MoEConfig) -> dict[str, bool]:
        return {} if moe.n_shared_experts else dict.fromkeys(_SHARED, False)

    def block_config(self, block: nn.Module) -> MoEConfig:
        experts, hidden, inner = block_expert_dims(block)
        silu_act(experts_activation(block.experts), "expert")
        silu_act(block.shared_experts.act_fn, "shared expert")
        gate = block.gate
        shared = int(block.shared_experts.gate_proj.weight.shape[0])
        return MoEConfig(hidden_size=hidden, moe_intermediate_size=inner, num_local_experts=experts,
                         num_experts_per_tok=int(gate.top_k), router="deepseek_v3", scoring_func="sigmoid",
                         norm_topk_prob=bool(gate.norm_topk_prob),
                         routed_scaling_factor=float(gate.routed_scaling_factor),
                         n_group=int(gate.num_group), topk_group=int(gate.topk_group),
                         n_shared_experts=max(1, math.ceil(shared / inner)) if shared else 0,
                         shared_expert_intermediate_size=shared or None)


def _pad(tensor: Tensor, dim: int, size: int) -> Tensor:
    """`tensor` extended with zeros along `dim` to `size`."""
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor.float(), torch.zeros(shape, device=tensor.device)], dim=dim)


class DeepseekV3(DeepSeekMoE):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    aliases = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "n_shared_experts": 1,
                "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
                "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "rope_interleave": True,
                "attention_bias": False, "moe_intermediate_size": 2048}
    block_classes = ("transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE",)

    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        values = dict(hf)
        values.pop("head_dim", None)  # transformers sets it to qk_rope_head_dim; MLA's widths are its own
        f = HFConfig(values, self, where)
        common = read_common(f)
        if common["num_key_value_heads"] != common["num_attention_heads"]:
            raise f.refuse(f"num_key_value_heads={common['num_key_value_heads']}", "its multi-head latent attention "
                           "expands one key and value per head (num_attention_heads="
                           f"{common['num_attention_heads']})")
        q_rank = hf["q_lora_rank"] if "q_lora_rank" in hf else self.defaults["q_lora_rank"]  # None: a plain q_proj
        mla = MLAConfig(q_lora_rank=None if q_rank is None else int(q_rank),
                        kv_lora_rank=f.integer("kv_lora_rank", 1), qk_nope_head_dim=f.integer("qk_nope_head_dim"),
                        qk_rope_head_dim=f.integer("qk_rope_head_dim", 2), v_head_dim=f.integer("v_head_dim", 1))
        bias = f.flag("attention_bias")
        return ModelConfig(**common, **read_rope(f), mla=mla, rope_interleave=f.flag("rope_interleave", True),
                           qkv_bias=bias, o_proj_bias=bias, **self.read_moe(f, common["hidden_size"],
                                                                              common["num_hidden_layers"]))

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        mla = config.mla
        assert mla is not None
        out = {**write_common(config), **write_rope(config), **self.write_moe(config), "q_lora_rank": mla.q_lora_rank,
               "kv_lora_rank": mla.kv_lora_rank, "qk_nope_head_dim": mla.qk_nope_head_dim,
               "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim,
               "rope_interleave": config.rope_interleave, "attention_bias": config.qkv_bias}
        out["head_dim"] = mla.qk_rope_head_dim
        return out

    def problems(self, config: ModelConfig) -> list[str]:
        problems = attention_problems(config, "DeepSeek-V3", mla=True, qkv_bias=True, o_proj_bias=True,
                                      tied_biases=True, rope_interleave=True)
        if config.mla is not None and config.mla.latent_norm_eps != 1e-6:
            problems.append(f"DeepSeek-V3's latent norms use epsilon 1e-6 (this model: {config.mla.latent_norm_eps})")
        return problems + self.moe_problems(config, "DeepSeek-V3")


FAMILY = DeepseekV3()
