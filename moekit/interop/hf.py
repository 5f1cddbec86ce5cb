"""Export a `MoETransformer` as a Hugging Face transformers checkpoint, and load such checkpoints back.

`export_hf(model, out_dir)` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
loads with the library's own model classes (no remote code) and that computes the same logits as the moekit
model. `load_hf(path)` reads such a directory (or a compatible checkpoint written by transformers) into a
`MoETransformer`. Neither function imports transformers: the files are plain JSON and safetensors.

Targets (`format=`):

- ``"mixtral"`` (`MixtralForCausalLM`): every layer MoE, softmax top-k with the kept weights renormalised, no
  shared experts, no selection bias, no group-limited routing.
- ``"qwen2_moe"`` (`Qwen2MoeForCausalLM`): softmax top-k, renormalised or not, one fused shared expert behind a
  sigmoid gate, dense layers anywhere (`mlp_only_layers`). Qwen2-MoE always gates its shared expert: a moekit
  model without a gate is written with a zero gate weight (sigmoid(0) = 1/2) and a doubled `down_proj`, which
  computes the same function exactly; a model without any shared expert is written with a shared expert of
  width 0, whose output is exactly 0. Qwen2 attention has q/k/v biases: they are written as zeros.
- ``"glm4_moe"`` (`Glm4MoeForCausalLM`): sigmoid scores, `e_score_correction_bias`, group-limited selection
  (`n_group`/`topk_group`), `routed_scaling_factor`, `norm_topk_prob`, shared experts and the first
  `first_k_dense_replace` layers dense, with standard grouped-query attention (written with
  `attention_bias=False`, `use_qk_norm=False` and `partial_rotary_factor=1.0`, so its rotary embedding is the
  same full-width, non-interleaved `rotate_half` RoPE as moekit's). This is where moekit's DeepSeek-V3-style
  models go. transformers' own `DeepseekV3ForCausalLM` uses multi-head latent attention (MLA): keys and values
  are projected up from an RMS-normalised low-rank latent, and the rotary part of the key is a single vector
  shared by all heads. Standard attention, whose keys and values are linear in the input and rotated per head,
  cannot be written into those weights exactly, so ``"deepseek_v3"`` is not a target.
  Glm4-MoE's shared expert width is `n_shared_experts * moe_intermediate_size`; a moekit shared width that is
  not a multiple of `moe_intermediate_size` is padded with zero units (they add exactly 0).
- ``"llama"`` (`LlamaForCausalLM`): dense models (`ModelConfig.moe is None`).
- ``"auto"`` (default): ``llama`` for a dense model, else the first of mixtral, qwen2_moe, glm4_moe that
  computes the model exactly.

A `routed_scaling_factor` other than 1 with softmax routing (mixtral, qwen2_moe) is folded into the routed
experts' `down_proj`. Routers that no transformers architecture computes (`noisy_topk`, `expert_choice`,
`soft`, `hierarchical`), token dropping (`capacity_factor`), non-zero selection biases with softmax scores and
GELU experts are refused with a `ValueError` that says why.

Checkpoints use the tensor layout that transformers' own `save_pretrained` writes (one tensor per expert
projection: `block_sparse_moe.experts.N.w1/w2/w3` for Mixtral, `mlp.experts.N.gate_proj/up_proj/down_proj`
otherwise); transformers 5 fuses them into its 3-D expert tensors while loading, and it is also the layout that
transformers 4 modules hold (`config.json` carries both the old and the new spellings of the RoPE and dtype
fields; only transformers 5 is tested). `config.json` also carries a ``"moekit"`` entry with the original
`ModelConfig`, so `load_hf` restores the exact moekit configuration (router name, balancing coefficients,
unpadded shared width...) when the checkpoint still matches it, and otherwise builds the configuration from the
transformers fields.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import (
    StorageError,
    fsync_dir,
    fsync_file,
    remove_stale_temps,
    storage_error,
    swap_in,
    temp_sibling,
    write_json,
)
from ..config import ModelConfig, MoEConfig
from ..model.transformer import MoETransformer
from .outputs import check_output, write_marker

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "EXPORT_FORMATS", "export_hf", "load_hf"]

EXPORT_FORMATS = ("auto", "mixtral", "qwen2_moe", "glm4_moe", "llama")
"""Values `export_hf` accepts for `format`."""

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
"""Largest safetensors file `export_hf` writes by default (2 GB); bigger models are sharded with an index."""

METADATA_KEY = "moekit"
"""Key of the moekit entry in an exported `config.json`."""

_MOE_FORMATS = ("mixtral", "qwen2_moe", "glm4_moe")
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
_UNSUPPORTED_ROUTERS = {
    "noisy_topk": "noisy top-k gating with a learned noise projection",
    "expert_choice": "expert-choice routing, where each expert picks its tokens across the batch",
    "soft": "Soft MoE, whose expert slots average the tokens of a sequence",
    "hierarchical": "two-level gating, a softmax over groups times a softmax inside each chosen group",
}
_MLA_MESSAGE = (
    "format='deepseek_v3' is not available: transformers' DeepseekV3ForCausalLM uses multi-head latent "
    "attention (MLA: keys and values come from an RMS-normalised low-rank latent, and one rotary key is shared "
    "by all heads), and moekit's standard grouped-query attention cannot be written into MLA exactly. moekit's "
    "DeepSeek-V3-style models (sigmoid scores, e_score_correction_bias, n_group/topk_group, "
    "routed_scaling_factor, shared experts, first dense layers) export exactly as format='glm4_moe' "
    "(Glm4MoeForCausalLM: the same MoE with standard attention); use format='glm4_moe' or format='auto'."
)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "moekit_tokenizer.json",
)
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
_EOS_TOKEN = "<|endoftext|>"

# Field defaults of the transformers configs, used only for fields a config.json leaves out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32},
    "qwen2_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "glm4_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ============================================================================================== export: checks
def _moe_layers(config: ModelConfig) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def _refuse_unexportable(moe: MoEConfig) -> None:
    """Raise for MoE features that no target computes, whatever the format."""
    if moe.router in _UNSUPPORTED_ROUTERS:
        hint = ""
        if moe.router == "noisy_topk":
            hint = (" (in eval mode noisy_topk computes a renormalised softmax top-k: for inference only, copy "
                    "router.weight into a router='topk' model and export that)")
        raise ValueError(
            f"export_hf: router={moe.router!r} ({_UNSUPPORTED_ROUTERS[moe.router]}) cannot be exported: no "
            f"transformers architecture computes it, so no Hugging Face checkpoint would reproduce this model's "
            f"outputs{hint}. Exportable routers: 'topk', 'switch' (without capacity_factor) and 'deepseek_v3'."
        )
    if moe.capacity_factor is not None:
        raise ValueError(
            f"export_hf: router={moe.router!r} with capacity_factor={moe.capacity_factor} drops the tokens over an "
            "expert's capacity; no transformers architecture computes that dropping, so the export could not "
            "match. Export a dropless model (capacity_factor=None)."
        )
    if moe.max_devices_per_token is not None and moe.max_devices_per_token < moe.expert_devices:
        raise ValueError(
            f"export_hf: max_devices_per_token={moe.max_devices_per_token} (device-limited routing over "
            f"expert_devices={moe.expert_devices} blocks) changes which experts a token gets, and no transformers "
            "architecture computes it; train without it (or with max_devices_per_token=expert_devices) to export."
        )
    if moe.hidden_act != "silu":
        raise ValueError(
            f"export_hf: hidden_act={moe.hidden_act!r} experts (a plain GELU FFN) have no transformers MoE "
            "counterpart; Mixtral, Qwen2-MoE and Glm4-MoE experts are SwiGLU (hidden_act='silu')."
        )


def _grouped(moe: MoEConfig) -> bool:
    """True when group-limited selection can change which experts a token gets."""
    return (moe.router == "deepseek_v3" and moe.n_group > 1 and moe.topk_group < moe.n_group
            and moe.num_local_experts // moe.n_group >= 2)


def _biased_layers(model: MoETransformer) -> list[int]:
    """Indices of MoE layers whose router has a nonzero selection bias."""
    out = []
    for i in _moe_layers(model.config):
        bias = getattr(model.layers[i].mlp.router, "e_score_correction_bias", None)
        if bias is not None and bool(bias.detach().ne(0).any()):
            out.append(i)
    return out


def _problems(model: MoETransformer, fmt: str) -> list[str]:
    """Why `fmt` cannot express `model` exactly (empty when it can)."""
    config, moe = model.config, model.config.moe
    moe_layers = _moe_layers(config)
    if fmt == "llama":
        return ["llama has no experts, and this model has MoE layers"] if moe_layers else []
    if moe is None or not moe_layers:
        return [f"{fmt} is an MoE architecture and this model is dense (export it as 'llama')"]
    problems = []
    if fmt in ("mixtral", "qwen2_moe"):
        if moe.scoring_func != "softmax":
            problems.append(f"{fmt} scores experts with a softmax, this model with scoring_func="
                            f"{moe.scoring_func!r}")
        if _grouped(moe):
            problems.append(f"{fmt} has no group-limited routing (this model: n_group={moe.n_group}, "
                            f"topk_group={moe.topk_group})")
        biased = _biased_layers(model)
        if biased:
            problems.append(f"{fmt} has no selection bias (e_score_correction_bias), which is nonzero in "
                            f"layers {biased}")
    if fmt == "mixtral":
        if not moe.resolved_norm_topk_prob:
            problems.append("Mixtral always renormalises the top-k weights, this model has norm_topk_prob=False")
        if moe.n_shared_experts:
            problems.append("Mixtral has no shared experts")
        dense = [i for i in range(config.num_hidden_layers) if i not in moe_layers]
        if dense:
            problems.append(f"Mixtral has an MoE FFN in every layer, layers {dense} are dense")
    if fmt == "glm4_moe":
        if moe.scoring_func != "sigmoid":
            problems.append(f"glm4_moe scores experts with a sigmoid, this model with scoring_func="
                            f"{moe.scoring_func!r}")
        if moe.shared_expert_gate:
            problems.append("Glm4-MoE's shared experts have no sigmoid gate (this model: shared_expert_gate=True)")
        first = config.num_hidden_layers - len(moe_layers)
        if moe_layers != list(range(first, config.num_hidden_layers)):
            problems.append(f"Glm4-MoE's dense layers are the first first_k_dense_replace layers, this model's MoE "
                            f"layers are {moe_layers}")
        if moe.num_local_experts < 2:
            problems.append("Glm4-MoE's router needs at least 2 experts")
    return problems


def _choose_format(model: MoETransformer, format: str) -> str:
    if format == "deepseek_v3":
        raise ValueError(f"export_hf: {_MLA_MESSAGE}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export_hf: format={format!r} is not allowed: one of {', '.join(EXPORT_FORMATS)}")
    config = model.config
    if config.moe is not None and _moe_layers(config):
        _refuse_unexportable(config.moe)
    if format != "auto":
        problems = _problems(model, format)
        if problems:
            fitting = [fmt for fmt in (*_MOE_FORMATS, "llama") if not _problems(model, fmt)]
            hint = f"; format={fitting[0]!r} (or 'auto') computes it exactly" if fitting else ""
            raise ValueError(f"export_hf: format={format!r} cannot express this model exactly: "
                             f"{'; '.join(problems)}{hint}")
        return format
    if config.moe is None or not _moe_layers(config):
        return "llama"
    reasons = {}
    for fmt in _MOE_FORMATS:
        problems = _problems(model, fmt)
        if not problems:
            return fmt
        reasons[fmt] = problems
    detail = "\n".join(f"  {fmt}: {'; '.join(problems)}" for fmt, problems in reasons.items())
    raise ValueError(f"export_hf: no transformers architecture computes this model exactly:\n{detail}")


def _resolve_dtype(dtype: torch.dtype | str | None, model: MoETransformer) -> torch.dtype:
    if dtype is None:
        return model.embed_tokens.weight.dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"export_hf: dtype={dtype!r} is not allowed: one of {', '.join(_DTYPES)} or None")
        return _DTYPES[name]
    if dtype not in _DTYPES.values():
        raise ValueError(f"export_hf: dtype={dtype!r} is not allowed: torch.float32, torch.float16, torch.bfloat16")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ============================================================================================== export: config
def _glm4_shared_count(moe: MoEConfig) -> int:
    """Glm4-MoE shared experts (of width moe_intermediate_size each) holding moekit's fused shared FFN."""
    return math.ceil(moe.resolved_shared_intermediate_size / moe.moe_intermediate_size)


def _hf_config(config: ModelConfig, fmt: str, dtype_name: str = "float32", bos: int | None = None,
               eos: int | None = None) -> dict[str, Any]:
    """The transformers `config.json` fields for `config` written as `fmt` (no moekit metadata)."""
    layers = config.num_hidden_layers
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[fmt]],
        "model_type": fmt,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    moe = config.moe
    moe_layers = _moe_layers(config)
    if fmt == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return out
    assert moe is not None
    routing = {"num_experts_per_tok": moe.num_experts_per_tok, "output_router_logits": False,
               "router_aux_loss_coef": moe.router_aux_loss_coef}
    if fmt == "mixtral":
        out.update(routing, intermediate_size=moe.moe_intermediate_size, num_local_experts=moe.num_local_experts,
                   router_jitter_noise=moe.router_jitter_noise, sliding_window=None)
    elif fmt == "qwen2_moe":
        out.update(routing, num_experts=moe.num_local_experts, moe_intermediate_size=moe.moe_intermediate_size,
                   shared_expert_intermediate_size=moe.resolved_shared_intermediate_size,
                   norm_topk_prob=moe.resolved_norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(layers) if i not in moe_layers], qkv_bias=True,
                   use_sliding_window=False, sliding_window=None, max_window_layers=layers,
                   layer_types=["full_attention"] * layers)
    elif fmt == "glm4_moe":
        grouped = _grouped(moe)
        out.update(routing, n_routed_experts=moe.num_local_experts, moe_intermediate_size=moe.moe_intermediate_size,
                   n_shared_experts=_glm4_shared_count(moe), routed_scaling_factor=moe.routed_scaling_factor,
                   n_group=moe.n_group if grouped else 1, topk_group=moe.topk_group if grouped else 1,
                   norm_topk_prob=moe.resolved_norm_topk_prob, first_k_dense_replace=layers - len(moe_layers),
                   attention_bias=False, use_qk_norm=False, partial_rotary_factor=1.0, num_nextn_predict_layers=0)
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
    else:  # pragma: no cover - guarded by _choose_format
        raise ValueError(f"unknown format {fmt!r}")
    return out


# ============================================================================================== export: tensors
@dataclass
class _Entry:
    """One tensor of the checkpoint, made only when its shard is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def materialize(self) -> Tensor:
        tensor = self.make().detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
        if tuple(tensor.shape) != self.shape:  # pragma: no cover - internal consistency
            raise RuntimeError(f"export_hf: {self.name} has shape {tuple(tensor.shape)}, expected {self.shape}")
        return tensor


def _same(t: Tensor) -> Callable[[], Tensor]:
    return lambda: t


def _scaled(t: Tensor, factor: float) -> Callable[[], Tensor]:
    return lambda: t.float() * factor


def _zeros(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.zeros(shape)


def _pad(t: Tensor, dim: int, size: int) -> Callable[[], Tensor]:
    """`t` extended with zeros along `dim` to `size`."""

    def make() -> Tensor:
        shape = list(t.shape)
        shape[dim] = size - t.shape[dim]
        return torch.cat([t.float(), torch.zeros(shape, device=t.device)], dim=dim)

    return make


def _entries(model: MoETransformer, fmt: str, dtype: torch.dtype) -> list[_Entry]:
    """Every tensor of the checkpoint for `model` written as `fmt`, under transformers' names."""
    config, moe = model.config, model.config.moe
    state = {name: t.detach() for name, t in model.state_dict().items()}
    hidden, head_dim = config.hidden_size, config.head_dim
    entries: list[_Entry] = []

    def add(name: str, shape: tuple[int, ...], make: Callable[[], Tensor], dt: torch.dtype = dtype) -> None:
        entries.append(_Entry(name, tuple(int(s) for s in shape), dt, make))

    def copy(name: str, source: str) -> None:
        add(name, tuple(state[source].shape), _same(state[source]))

    copy("model.embed_tokens.weight", "embed_tokens.weight")
    for i in range(config.num_hidden_layers):
        hf, mk = f"model.layers.{i}", f"layers.{i}"
        copy(f"{hf}.input_layernorm.weight", f"{mk}.input_layernorm.weight")
        copy(f"{hf}.post_attention_layernorm.weight", f"{mk}.post_attention_layernorm.weight")
        for proj in ("q", "k", "v", "o"):
            copy(f"{hf}.self_attn.{proj}_proj.weight", f"{mk}.self_attn.{proj}_proj.weight")
        if fmt == "qwen2_moe":  # Qwen2 attention always has q/k/v biases
            rows = {"q": config.num_attention_heads * head_dim, "k": config.kv_heads * head_dim,
                    "v": config.kv_heads * head_dim}
            for proj, size in rows.items():
                add(f"{hf}.self_attn.{proj}_proj.bias", (size,), _zeros(size))
        if not config.is_moe_layer(i):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                copy(f"{hf}.mlp.{proj}.weight", f"{mk}.mlp.{proj}.weight")
            continue
        assert moe is not None
        num_experts, inter = moe.num_local_experts, moe.moe_intermediate_size
        gate_up, down = state[f"{mk}.mlp.experts.gate_up_proj"], state[f"{mk}.mlp.experts.down_proj"]
        scale = moe.routed_scaling_factor if fmt in ("mixtral", "qwen2_moe") else 1.0
        base = f"{hf}.block_sparse_moe" if fmt == "mixtral" else f"{hf}.mlp"
        names = ("w1", "w3", "w2") if fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        copy(f"{base}.gate.weight", f"{mk}.mlp.router.weight")
        for e in range(num_experts):
            add(f"{base}.experts.{e}.{names[0]}.weight", (inter, hidden), _same(gate_up[e, :inter]))
            add(f"{base}.experts.{e}.{names[1]}.weight", (inter, hidden), _same(gate_up[e, inter:]))
            make = _scaled(down[e], scale) if scale != 1.0 else _same(down[e])
            add(f"{base}.experts.{e}.{names[2]}.weight", (hidden, inter), make)
        width = moe.resolved_shared_intermediate_size
        shared = f"{mk}.mlp.shared_experts"
        if fmt == "qwen2_moe":
            if width:
                copy(f"{base}.shared_expert.gate_proj.weight", f"{shared}.gate_proj.weight")
                copy(f"{base}.shared_expert.up_proj.weight", f"{shared}.up_proj.weight")
                if moe.shared_expert_gate:
                    copy(f"{base}.shared_expert.down_proj.weight", f"{shared}.down_proj.weight")
                    copy(f"{base}.shared_expert_gate.weight", f"{shared}.gate.weight")
                else:  # sigmoid(0) = 1/2 times twice the output: the ungated shared expert, exactly
                    add(f"{base}.shared_expert.down_proj.weight", (hidden, width),
                        _scaled(state[f"{shared}.down_proj.weight"], 2.0))
                    add(f"{base}.shared_expert_gate.weight", (1, hidden), _zeros(1, hidden))
            else:  # a width-0 shared expert adds exactly 0
                add(f"{base}.shared_expert.gate_proj.weight", (0, hidden), _zeros(0, hidden))
                add(f"{base}.shared_expert.up_proj.weight", (0, hidden), _zeros(0, hidden))
                add(f"{base}.shared_expert.down_proj.weight", (hidden, 0), _zeros(hidden, 0))
                add(f"{base}.shared_expert_gate.weight", (1, hidden), _zeros(1, hidden))
        elif fmt == "glm4_moe":
            bias = state.get(f"{mk}.mlp.router.e_score_correction_bias")
            add(f"{base}.gate.e_score_correction_bias", (num_experts,),
                _same(bias) if bias is not None else _zeros(num_experts), torch.float32)
            padded = _glm4_shared_count(moe) * inter
            if width:  # zero units up to n_shared_experts * moe_intermediate_size add exactly 0
                for proj in ("gate_proj", "up_proj"):
                    add(f"{base}.shared_experts.{proj}.weight", (padded, hidden),
                        _pad(state[f"{shared}.{proj}.weight"], 0, padded))
                add(f"{base}.shared_experts.down_proj.weight", (hidden, padded),
                    _pad(state[f"{shared}.down_proj.weight"], 1, padded))
            else:
                add(f"{base}.shared_experts.gate_proj.weight", (0, hidden), _zeros(0, hidden))
                add(f"{base}.shared_experts.up_proj.weight", (0, hidden), _zeros(0, hidden))
                add(f"{base}.shared_experts.down_proj.weight", (hidden, 0), _zeros(hidden, 0))
    copy("model.norm.weight", "norm.weight")
    if not config.tie_word_embeddings:
        copy("lm_head.weight", "lm_head.weight")
    return entries


# ============================================================================================== export: files
def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    import safetensors.torch  # looked up at call time, so tests can replace the writer

    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _split_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """`entries` in order, cut into shards of at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _save_shard(entries: list[_Entry], path: Path) -> None:
    _save_safetensors({e.name: e.materialize() for e in entries}, path)


def _write_weights(directory: Path, entries: list[_Entry], max_shard_bytes: int,
                   save: Callable[[list[_Entry], Path], None] | None = None,
                   on_shard: Callable[[], None] | None = None) -> None:
    """Write `entries` as one safetensors file, or as shards with an index; `save` writes one file."""
    save = save or _save_shard
    shards = _split_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        save(shards[0], directory / "model.safetensors")
        if on_shard is not None:
            on_shard()
        return
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save(shard, directory / filename)
        weight_map.update(dict.fromkeys((e.name for e in shard), filename))
        if on_shard is not None:
            on_shard()
    total = sum(e.nbytes for e in entries)
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})


@dataclass
class _TokenizerFiles:
    files: list[Path]
    bos: int | None
    eos: int | None
    write_config: dict[str, Any] | None  # a tokenizer_config.json to add, when the folder has none


def _token_id(tokenizer_json: dict[str, Any], token: str) -> int | None:
    for added in tokenizer_json.get("added_tokens") or []:
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _tokenizer_files(tokenizer_dir: str | os.PathLike[str], max_length: int) -> _TokenizerFiles:
    """The tokenizer files of `tokenizer_dir` to copy, and the bos/eos ids they define."""
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"export_hf: tokenizer_dir={str(src)!r} is not a directory")
    files = [src / name for name in _TOKENIZER_FILES if (src / name).is_file()]
    if not files:
        raise ValueError(f"export_hf: tokenizer_dir={str(src)!r} holds no tokenizer file; expected one of "
                         f"{', '.join(_TOKENIZER_FILES)}")
    if not any((src / name).is_file() for name in _HF_TOKENIZER_FILES):
        warnings.warn(f"export_hf: {src} has no tokenizer file that transformers reads (such as tokenizer.json); "
                      "the files are copied, but AutoTokenizer will not load them", stacklevel=3)
    tok_json: dict[str, Any] = {}
    if (src / "tokenizer.json").is_file():
        tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_of(key: str) -> str | None:
        value = tok_config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    bos_token, eos_token = token_of("bos_token"), token_of("eos_token")
    if eos_token is None and tok_json and _token_id(tok_json, _EOS_TOKEN) is not None:
        eos_token = _EOS_TOKEN
    bos = _token_id(tok_json, bos_token) if bos_token and tok_json else None
    eos = _token_id(tok_json, eos_token) if eos_token and tok_json else None
    marker = src / "moekit_tokenizer.json"
    if eos is None and marker.is_file():  # moekit's byte tokenizer: special tokens follow the 256 bytes
        meta = json.loads(marker.read_text(encoding="utf-8"))
        specials = meta.get("special_tokens") or []
        if meta.get("type") == "byte" and _EOS_TOKEN in specials:
            eos = 256 + specials.index(_EOS_TOKEN)
    write_config = None
    if tok_json and not tok_config:
        write_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                        "clean_up_tokenization_spaces": False}
        if eos_token is not None:
            write_config["eos_token"] = eos_token
    return _TokenizerFiles(files, bos, eos, write_config)


_COMMANDS = {"export_hf": "export", "merge": "merge", "upcycle": "upcycle"}
_WHAT = {"export": "Hugging Face export", "merge": "merged model", "upcycle": "upcycled model"}


def _check_destination(out: Path, overwrite: bool, caller: str = "export_hf",
                       inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse an `out` that `caller` may not write (see `moekit.interop.outputs.check_output`)."""
    check_output(out, overwrite=overwrite, caller=caller, inputs=inputs,
                 label="out_dir" if caller == "export_hf" else "out")


@contextlib.contextmanager
def _output_faults(what: str, out: Path, needed: int | None) -> Iterator[None]:
    """Re-raise a storage fault in the block as one `StorageError` about the whole output `out`."""
    try:
        yield
    except Exception as error:
        # a StorageError from a helper names one file of the temporary folder: explain its cause for `out` instead
        cause = error.__cause__ if isinstance(error, StorageError) and error.__cause__ is not None else error
        explained = storage_error(cause, what, out, needed)
        if explained is None:
            raise
        raise explained from cause


def _sync_folder(folder: Path) -> None:
    """Flush every file of `folder`, then the folder itself, to the disk (before it is renamed into place)."""
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            fsync_file(entry)
    fsync_dir(folder)


def _write_atomically(out_dir: str | os.PathLike[str], overwrite: bool, write: Callable[[Path], None],
                      caller: str = "export_hf", *, inputs: Sequence[str | os.PathLike[str] | None] = (),
                      needed: int | None = None) -> Path:
    """Run `write` on a fresh folder next to `out_dir`, add the output marker, then rename it into place.

    `out_dir` appears only once complete; when `write` fails, the folder is removed and an existing
    `out_dir` is left as it was. The destination is checked before and again just before the swap; a dead
    writer's temporary folders next to `out_dir` are removed first. A full disk, a file-size limit or a
    read-only or forbidden destination raises one `StorageError` naming `out_dir` and `needed` (the output's
    bytes). `caller` names the function in error messages.
    """
    out = Path(out_dir).expanduser().absolute()
    command = _COMMANDS[caller]
    what = _WHAT[command]
    _check_destination(out, overwrite, caller, inputs)
    tmp: Path | None = None
    try:
        with _output_faults(what, out, needed):
            remove_stale_temps(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(out)
            tmp.mkdir()
            write(tmp)
            write_marker(tmp, command)
            _sync_folder(tmp)
        _check_destination(out, overwrite, caller, inputs)  # something may have appeared meanwhile
        with _output_faults(what, out, needed):
            swap_in(tmp, out, temp_sibling(out, "old"))
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf(model: MoETransformer, out_dir: str | os.PathLike[str], format: str = "auto",
              dtype: torch.dtype | str | None = None, tokenizer_dir: str | os.PathLike[str] | None = None, *,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Write `model` as a transformers checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
        model: the moekit model.
        out_dir: the folder to create. It must not exist or be empty, unless `overwrite=True`.
        format: ``"auto"``, ``"mixtral"``, ``"qwen2_moe"``, ``"glm4_moe"`` or ``"llama"`` (see the module
            docstring for what each expresses). A format that cannot compute the model exactly is refused
            with the reasons; ``"deepseek_v3"`` is refused with why (multi-head latent attention).
        dtype: dtype of the written weights (``torch.bfloat16``, ``"float32"``, ...); None keeps the model's.
            The selection bias `e_score_correction_bias` is always written in float32.
        tokenizer_dir: a folder whose tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...)
            are copied; its end-of-text token becomes ``eos_token_id``. A ``tokenizer.json`` without a
            ``tokenizer_config.json`` gets a minimal one naming ``PreTrainedTokenizerFast``.
        overwrite: replace a non-empty `out_dir` that moekit wrote (it holds ``moekit_output.json`` and only
            the files that lists; see `moekit.interop.outputs`). The old folder stays until the new one is
            complete. A training run or any other folder is never replaced.
        max_shard_bytes: largest safetensors file; a bigger checkpoint is split into
            ``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json``.
        inputs: paths this export reads (the training run, for the CLI): `out_dir` may not be, contain or lie
            inside any of them, with or without `overwrite`.

    Returns:
        The absolute path of the written folder, which holds ``config.json``, ``generation_config.json``, the
        weights and ``moekit_output.json``. Everything is written into a temporary folder next to `out_dir`
        and renamed into place, so `out_dir` never holds a partial export.

    Raises:
        ValueError: the model cannot be expressed exactly in the requested format (or in any, for
            ``"auto"``), an argument is invalid, or `out_dir` overlaps one of `inputs`.
        FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False; or it is a training run
            or a folder moekit did not write (the message names the first foreign entry).
        StorageError: the disk filled up, a file-size limit was reached, or the destination is read-only or
            forbidden (one line; the temporary folder is removed and a previous `out_dir` kept).
    """
    if not isinstance(model, MoETransformer):
        raise TypeError(f"export_hf: model must be a moekit MoETransformer, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"export_hf: max_shard_bytes={max_shard_bytes!r} is not allowed: a positive integer")
    fmt = _choose_format(model, format)
    out_dtype = _resolve_dtype(dtype, model)
    _check_destination(Path(out_dir).expanduser().absolute(), overwrite, "export_hf", inputs)
    tokenizer = (_tokenizer_files(tokenizer_dir, model.config.max_position_embeddings)
                 if tokenizer_dir is not None else None)
    bos = tokenizer.bos if tokenizer else None
    eos = tokenizer.eos if tokenizer else None
    hf_config = _hf_config(model.config, fmt, _dtype_name(out_dtype), bos, eos)
    hf_config[METADATA_KEY] = {"format_version": 1, "format": fmt, "model_config": model.config.to_dict()}
    generation_config = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
                         "pad_token_id": None, "use_cache": True}
    entries = _entries(model, fmt, out_dtype)
    needed = sum(e.nbytes for e in entries) + sum(p.stat().st_size for p in (tokenizer.files if tokenizer else []))

    def write(directory: Path) -> None:
        _write_weights(directory, entries, max_shard_bytes)
        write_json(directory / "config.json", hf_config)
        write_json(directory / "generation_config.json", generation_config)
        if tokenizer is not None:
            for path in tokenizer.files:
                shutil.copyfile(path, directory / path.name)
            if tokenizer.write_config is not None:
                write_json(directory / "tokenizer_config.json", tokenizer.write_config)

    with torch.no_grad():
        return _write_atomically(out_dir, overwrite, write, "export_hf", inputs=inputs, needed=needed)


# ============================================================================================== load: config
def _layer_pattern(is_moe: list[bool], where: str, model_type: str) -> tuple[int, int]:
    """(first_k_dense_replace, moe_layer_freq) giving exactly the MoE layers `is_moe`."""
    layers = len(is_moe)
    if not any(is_moe):
        return layers, 1
    first = is_moe.index(True)
    for freq in range(1, layers + 1):
        if all(is_moe[i] == (i >= first and (i - first) % freq == 0) for i in range(layers)):
            return first, freq
    moe_layers = [i for i, flag in enumerate(is_moe) if flag]
    raise ValueError(f"load_hf: {where}: the {model_type} config puts MoE FFNs in layers {moe_layers}, which moekit's "
                     "first_k_dense_replace / moe_layer_freq (dense first layers, then MoE every n-th layer) "
                     "cannot express")


def _infer_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """The moekit `ModelConfig` computing what transformers computes for this `config.json`."""
    model_type = hf.get("model_type")
    defaults = _HF_DEFAULTS[model_type]

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"load_hf: {where}: config.json has no {key!r}, which a {model_type} config needs")
        return hf[key]

    def refuse(what: str) -> ValueError:
        return ValueError(f"load_hf: {where}: {model_type} with {what} is not supported: moekit cannot compute "
                          "it exactly")

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise refuse(f"hidden_act={act!r} (moekit's FFNs are SwiGLU with SiLU)")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim")
    if head_dim is not None and (hidden % heads or int(head_dim) != hidden // heads):
        raise refuse(f"head_dim={head_dim} != hidden_size / num_attention_heads = {hidden}/{heads} (moekit derives "
                     "the head dimension from those)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type != "default":
        raise refuse(f"rope_type={rope_type!r} (moekit's RoPE is the default, unscaled one)")
    theta = rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                       0.5 if model_type == "glm4_moe" else 1.0))
    if float(partial) != 1.0:
        raise refuse(f"partial_rotary_factor={partial} (moekit rotates the whole head dimension)")
    if hf.get("use_qk_norm"):
        raise refuse("use_qk_norm=True (moekit's attention has no query/key norm)")
    if hf.get("use_sliding_window") or (model_type == "mixtral" and hf.get("sliding_window") is not None):
        raise refuse(f"sliding_window={hf.get('sliding_window')} (moekit's attention is full causal attention)")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise refuse(f"layer_types={hf.get('layer_types')} (moekit's attention is full causal attention)")
    layers = int(need("num_hidden_layers"))
    common: dict[str, Any] = {
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
        "intermediate_size": int(need("intermediate_size")),
        "max_position_embeddings": int(hf.get("max_position_embeddings") or defaults["max_position_embeddings"]),
        "rope_theta": float(theta),
        "rms_norm_eps": float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    try:
        if model_type == "llama":
            return ModelConfig(**common)
        if model_type == "mixtral":
            moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=common["intermediate_size"],
                            num_local_experts=int(need("num_local_experts")),
                            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)), router="topk",
                            norm_topk_prob=True, router_jitter_noise=float(hf.get("router_jitter_noise") or 0.0))
            is_moe = [True] * layers
        elif model_type == "qwen2_moe":
            num_experts = int(need("num_experts"))
            shared = int(hf.get("shared_expert_intermediate_size") or 0)
            moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=int(need("moe_intermediate_size")),
                            num_local_experts=num_experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 4)),
                            router="topk", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                            n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared or None,
                            shared_expert_gate=bool(shared))
            step = int(hf.get("decoder_sparse_step") or 1)
            dense = set(hf.get("mlp_only_layers") or [])
            is_moe = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
        elif model_type == "glm4_moe":
            moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=int(need("moe_intermediate_size")),
                            num_local_experts=int(need("n_routed_experts")),
                            num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)), router="deepseek_v3",
                            scoring_func="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                            n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
                            n_shared_experts=int(hf.get("n_shared_experts", 1) or 0))
            first = int(hf.get("first_k_dense_replace", 1))
            is_moe = [i >= first for i in range(layers)]
        else:  # pragma: no cover - guarded by load_hf
            raise ValueError(f"model_type={model_type!r}")
        if not any(is_moe):
            return ModelConfig(**common)
        first_k, freq = _layer_pattern(is_moe, where, model_type)
        return ModelConfig(**common, first_k_dense_replace=first_k, moe_layer_freq=freq, moe=moe)
    except ValueError as err:
        if str(err).startswith("load_hf:"):
            raise
        raise ValueError(f"load_hf: {where}: this {model_type} config has no moekit equivalent: {err}") from err


# ============================================================================================== load: tensors
class _Tensors:
    """The checkpoint's tensors; every tensor must be used once (leftovers are an error)."""

    def __init__(self, tensors: dict[str, Tensor], where: str, model_type: str) -> None:
        self.tensors, self.where, self.model_type = tensors, where, model_type

    def has(self, name: str) -> bool:
        return name in self.tensors

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.tensors)

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ValueError(f"load_hf: {self.where}: tensor {name!r} is missing; a {self.model_type} checkpoint "
                             "with this config.json has it (is the checkpoint complete?)")
        return self.tensors.pop(name)

    def take_zero(self, name: str, why: str) -> None:
        """Remove an optional tensor that moekit has no place for, refusing it unless it is all zeros."""
        tensor = self.tensors.pop(name, None)
        if tensor is not None and tensor.numel() and bool(tensor.ne(0).any()):
            raise ValueError(f"load_hf: {self.where}: tensor {name!r} is nonzero, and {why}, so this checkpoint "
                             "cannot be loaded exactly")

    def check_all_used(self, num_layers: int) -> None:
        leftover = []
        for name in self.tensors:
            match = re.match(r"model\.layers\.(\d+)\.", name)
            if match and int(match.group(1)) >= num_layers:
                continue  # extra layers (e.g. GLM's multi-token-prediction layer) are not part of the LM
            if name.endswith("rotary_emb.inv_freq"):
                continue
            leftover.append(name)
        if leftover:
            raise ValueError(f"load_hf: {self.where}: tensor {leftover[0]!r} has no place in a moekit model built "
                             f"from this {self.model_type} config.json ({len(leftover)} unexpected tensor(s))")


def _read_tensors(root: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        tensors: dict[str, Tensor] = {}
        for filename in sorted(set(weight_map.values())):
            tensors.update(load_file(str(root / filename)))
    elif single.is_file():
        tensors = load_file(str(single))
    else:
        raise FileNotFoundError(f"load_hf: {root} has no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    if "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors:  # a base-model save
        tensors = {name if name.startswith("lm_head.") else f"model.{name}": t for name, t in tensors.items()}
    return tensors


def _read_experts(pool: _Tensors, base: str, names: tuple[str, str, str], num_experts: int) -> tuple[Tensor, Tensor]:
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) from fused or per-expert tensors."""
    if pool.has(f"{base}.experts.gate_up_proj"):
        return pool.take(f"{base}.experts.gate_up_proj"), pool.take(f"{base}.experts.down_proj")
    gate_up, down = [], []
    for e in range(num_experts):
        gate = pool.take(f"{base}.experts.{e}.{names[0]}.weight")
        up = pool.take(f"{base}.experts.{e}.{names[1]}.weight")
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(pool.take(f"{base}.experts.{e}.{names[2]}.weight"))
    return torch.stack(gate_up), torch.stack(down)


def _map_state(hf: dict[str, Any], config: ModelConfig, pool: _Tensors) -> dict[str, Tensor]:
    """moekit state dict (names of `MoETransformer`) from the checkpoint's tensors."""
    model_type = hf["model_type"]
    no_bias = "moekit's projections have no bias"
    state = {"embed_tokens.weight": pool.take("model.embed_tokens.weight"),
             "norm.weight": pool.take("model.norm.weight")}
    if config.tie_word_embeddings:
        pool.tensors.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = pool.take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        hf_prefix, mk = f"model.layers.{i}", f"layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{mk}.{norm}.weight"] = pool.take(f"{hf_prefix}.{norm}.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{mk}.self_attn.{proj}.weight"] = pool.take(f"{hf_prefix}.self_attn.{proj}.weight")
            pool.take_zero(f"{hf_prefix}.self_attn.{proj}.bias", no_bias)
        if not config.is_moe_layer(i):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{mk}.mlp.{proj}.weight"] = pool.take(f"{hf_prefix}.mlp.{proj}.weight")
                pool.take_zero(f"{hf_prefix}.mlp.{proj}.bias", no_bias)
            continue
        moe = config.moe
        assert moe is not None
        if model_type == "mixtral":
            legacy = pool.has_prefix(f"{hf_prefix}.block_sparse_moe.")
            base = f"{hf_prefix}.block_sparse_moe" if legacy else f"{hf_prefix}.mlp"
            names = ("w1", "w3", "w2")
        else:
            base, names = f"{hf_prefix}.mlp", ("gate_proj", "up_proj", "down_proj")
        state[f"{mk}.mlp.router.weight"] = pool.take(f"{base}.gate.weight")
        gate_up, down = _read_experts(pool, base, names, moe.num_local_experts)
        state[f"{mk}.mlp.experts.gate_up_proj"], state[f"{mk}.mlp.experts.down_proj"] = gate_up, down
        shared = f"{mk}.mlp.shared_experts"
        if model_type == "qwen2_moe":
            hf_names = {"gate_proj": "shared_expert.gate_proj", "up_proj": "shared_expert.up_proj",
                        "down_proj": "shared_expert.down_proj", "gate": "shared_expert_gate"}
        else:
            hf_names = {"gate_proj": "shared_experts.gate_proj", "up_proj": "shared_experts.up_proj",
                        "down_proj": "shared_experts.down_proj"}
        for mk_name, hf_name in hf_names.items():
            if moe.n_shared_experts:
                state[f"{shared}.{mk_name}.weight"] = pool.take(f"{base}.{hf_name}.weight")
            elif mk_name != "gate":  # a width-0 shared expert; its gate multiplies 0
                pool.take_zero(f"{base}.{hf_name}.weight", "this config has no shared expert")
            else:
                pool.tensors.pop(f"{base}.{hf_name}.weight", None)
        if model_type == "glm4_moe":
            name = f"{base}.gate.e_score_correction_bias"
            bias = pool.take(name) if pool.has(name) else torch.zeros(moe.num_local_experts)
            state[f"{mk}.mlp.router.e_score_correction_bias"] = bias.float()
    pool.check_all_used(config.num_hidden_layers)
    return state


class _StaleMetadata(Exception):
    """The moekit entry of config.json no longer describes the checkpoint."""


def _restore(hf: dict[str, Any], inferred: ModelConfig, state: dict[str, Tensor],
             where: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Undo what export did for the moekit config stored in config.json (exact where export was exact)."""
    meta = hf[METADATA_KEY]
    fmt = hf["model_type"]
    if not isinstance(meta, dict) or meta.get("format") != fmt or "model_config" not in meta:
        raise _StaleMetadata(f"its format is not {fmt!r}")
    try:
        stored = ModelConfig.from_dict(dict(meta["model_config"]))
    except (TypeError, ValueError) as err:
        raise _StaleMetadata(f"its model_config is invalid ({err})") from err
    try:
        regenerated = _infer_config(_hf_config(stored, fmt), where)
    except ValueError as err:
        raise _StaleMetadata(f"its model_config cannot be written as {fmt!r} ({err})") from err
    if regenerated != inferred:
        raise _StaleMetadata("config.json's transformers fields were changed after export")
    moe = stored.moe
    state = dict(state)
    for i in _moe_layers(stored):
        assert moe is not None
        layer = f"layers.{i}.mlp"
        if fmt in ("mixtral", "qwen2_moe") and moe.routed_scaling_factor != 1.0:
            down = state[f"{layer}.experts.down_proj"]
            state[f"{layer}.experts.down_proj"] = (down.float() / moe.routed_scaling_factor).to(down.dtype)
        bias_name = f"{layer}.router.e_score_correction_bias"
        if moe.uses_aux_free_bias:
            state.setdefault(bias_name, torch.zeros(moe.num_local_experts))
        elif bias_name in state and bool(state.pop(bias_name).ne(0).any()):
            raise _StaleMetadata(f"layer {i}'s e_score_correction_bias is nonzero but the stored router has none")
        shared = f"{layer}.shared_experts"
        if moe.n_shared_experts and fmt == "qwen2_moe" and not moe.shared_expert_gate:
            if bool(state.pop(f"{shared}.gate.weight").ne(0).any()):
                raise _StaleMetadata(f"layer {i}'s shared_expert_gate is nonzero but the stored model has no gate")
            down = state[f"{shared}.down_proj.weight"]
            state[f"{shared}.down_proj.weight"] = (down.float() / 2).to(down.dtype)
        if moe.n_shared_experts and fmt == "glm4_moe":
            width = moe.resolved_shared_intermediate_size
            parts = {"gate_proj": (0, width), "up_proj": (0, width), "down_proj": (1, width)}
            for proj, (dim, size) in parts.items():
                tensor = state[f"{shared}.{proj}.weight"]
                kept, padding = tensor.split([size, tensor.shape[dim] - size], dim=dim)
                if bool(padding.ne(0).any()):
                    raise _StaleMetadata(f"layer {i}'s shared expert padding is nonzero")
                state[f"{shared}.{proj}.weight"] = kept.contiguous()
    return stored, state


def load_hf(path: str | os.PathLike[str], dtype: torch.dtype | str | None = None) -> MoETransformer:
    """Read a transformers checkpoint folder into a `MoETransformer` (in eval mode).

    Reads ``config.json`` and ``model.safetensors`` (or the shards of ``model.safetensors.index.json``) of a
    ``mixtral``, ``qwen2_moe``, ``glm4_moe`` or ``llama`` model, in the per-expert layout that
    `save_pretrained` writes or transformers 5's fused one. A folder written by `export_hf` gives back the
    exported moekit configuration and identical logits; for other checkpoints the configuration is derived
    from the transformers fields (Qwen2-MoE's gated shared expert becomes `shared_expert_gate=True`, Glm4-MoE
    routing becomes `router="deepseek_v3"` with sigmoid scores).

    Args:
        path: the checkpoint folder.
        dtype: dtype of the returned model's parameters; None keeps the checkpoint's.

    Raises:
        ValueError: an unsupported `model_type` or feature (sliding windows, scaled RoPE, partial rotary,
            query/key norms, nonzero attention biases...), or a missing, unexpected or misshapen tensor;
            the message names it.
        FileNotFoundError: no ``config.json`` or no safetensors weights.
    """
    root = Path(path).expanduser()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_hf: {root} has no config.json; pass a transformers checkpoint folder")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    where = str(root)
    model_type = hf.get("model_type")
    if model_type == "deepseek_v3":
        raise ValueError(f"load_hf: {where}: model_type='deepseek_v3' uses multi-head latent attention (MLA), which "
                         "moekit's standard grouped-query attention cannot compute; moekit reads mixtral, qwen2_moe, "
                         "glm4_moe and llama checkpoints")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"load_hf: {where}: model_type={model_type!r} is not supported; moekit reads "
                         f"{', '.join(_HF_DEFAULTS)} checkpoints")
    config = _infer_config(hf, where)
    state = _map_state(hf, config, _Tensors(_read_tensors(root), where, model_type))
    if METADATA_KEY in hf:
        try:
            config, state = _restore(hf, config, state, where)
        except (_StaleMetadata, KeyError, RuntimeError) as err:
            warnings.warn(f"load_hf: {where}: the moekit entry of config.json does not describe this checkpoint "
                          f"({err}); building the configuration from the transformers fields instead", stacklevel=2)
            config = _infer_config(hf, where)
            state = _map_state(hf, config, _Tensors(_read_tensors(root), where, model_type))
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"load_hf: dtype={dtype!r} is not allowed: one of {', '.join(_DTYPES)} or None")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    target = dtype or state["embed_tokens.weight"].dtype
    model = MoETransformer(config).to(target)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ValueError(f"load_hf: {where}: the checkpoint has no tensor for moekit's {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"load_hf: {where}: the checkpoint's tensor for moekit's {name!r} has shape "
                             f"{tuple(state[name].shape)}, but config.json implies {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"load_hf: {where}: the checkpoint's tensor for {unexpected[0]!r} has no place in the model")
    model.load_state_dict(state, strict=False)
    return model.eval()
