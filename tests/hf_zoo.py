"""A zoo of every Mixture-of-Experts block class in the installed transformers, as tiny randomised modules.

For each model_type whose modeling module defines an experts module, a tiny (text) config is made by shrinking
every size field that exists (`SMALL`, plus a short table of per-family `OVERRIDES`), the tiny CausalLM (or base
model) is built from it, every weight is set from a seeded generator the way a trained checkpoint has them
(`randomise`), and every module that owns an experts module as its `experts` child is collected, one per class.

    for zb in moe_block_classes():          # cached; one ZooBlock per distinct block class
        out = call_block(zb.block, torch.randn(2, 5, zb.hidden_size))

Families that contribute no block (they cannot be built on CPU here, or own no experts module) are listed, with
the reason, in `SKIPPED` once `moe_block_classes()` has run. The zoo's blocks are shared by every caller in the
process: copy one (`copy.deepcopy(zb.block)`) before changing it. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import logging
import os
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

__all__ = ["SKIPPED", "ZooBlock", "call_block", "moe_block_classes", "randomise", "tiny_config", "tiny_model"]

# ---------------------------------------------------------------------------------------------- tiny configs
# Field -> small value, applied to every (text) config that has the field with a non-None value.
SMALL: dict[str, Any] = {
    # widths
    "hidden_size": 32, "d_model": 32,
    "intermediate_size": 48, "ffn_hidden_size": 48, "d_ff": 48, "dense_intermediate_size": 48,
    "first_dense_intermediate_size": 48, "intermediate_size_mlp": 48, "mlp_only_intermediate_size": 48,
    "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "prefix_dense_intermediate_size": 48,
    "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16, "moe_hidden_size": 16,
    "shared_expert_intermediate_size": 48, "shared_experts_intermediate_size": 48,
    "moe_shared_expert_intermediate_size": 48, "shared_intermediate_size": 48, "share_expert_dim": 48,
    # depth (families whose first layers are dense get `first_k_dense_replace` etc. below)
    "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2,
    # attention
    "num_attention_heads": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8, "kv_channels": 8,
    "num_attention_heads_per_layer": 4, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
    "num_sliding_attention_heads": 4,
    # MLA (DeepSeek-style latent attention) and sparse-attention indexers
    "kv_lora_rank": 16, "q_lora_rank": 24, "o_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "qk_head_dim": 16, "v_head_dim": 8, "rotary_dim": 8,
    "index_head_dim": 8, "index_n_heads": 2, "index_num_heads": 2, "index_topk": 16,
    # linear attention / Mamba mixers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 8, "linear_num_heads": 4, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_num_heads": 4,
    "mamba_head_dim": 8, "mamba_d_head": 8, "mamba_dt_rank": 8, "mamba_n_groups": 1, "n_groups": 1,
    "ssm_state_size": 8, "mamba_chunk_size": 16, "chunk_size": 16,
    # embeddings
    "vocab_size": 128, "max_position_embeddings": 128, "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8, "unpadded_vocab_size": 128, "rel_extent": 32, "hc_lowrank": 16,
    # experts and routing
    "num_local_experts": 8, "num_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_k": 2, "moe_topk": 2, "moe_top_k": 2,
    "n_group": 4, "topk_group": 2, "num_expert_group": 4, "router_hidden_size": 16, "zero_expert_num": 4,
    # make (almost) every layer sparse
    "first_k_dense_replace": 1, "decoder_sparse_step": 1, "encoder_sparse_step": 1, "mlp_only_layers": [],
    "moe_layer_freq": 1, "num_dense_layers": 1, "enable_moe_block": True, "top_k_experts": 2,
}

# Per-family overrides, applied after `SMALL` (keyed by model_type; "*_text" sub-configs use their own key).
OVERRIDES: dict[str, dict[str, Any]] = {
    # nested attention / FFN sub-configs (and the attention reads a `rope_theta` its config class lacks)
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2}},
    # default configs that leave a required field None (a checkpoint's config.json sets it)
    "deepseek_ocr2": {"num_hidden_layers": 2, "mlp_layer_types": ["dense", "sparse"]},
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"]},
    # the default layer pattern has QSA-indexed layers whose indexer sizes default to None
    "qwen4_exp": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "linear_attention"]},
    # Mamba heads must tile mamba_expand * hidden_size
    "granitemoehybrid": {"mamba_d_head": 16},
    # M-RoPE sections (time, height, width) must sum to the tiny rotary dim // 2 (glm4v_moe: for the full model)
    "ernie4_5_vl_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [1, 1, 2]}},
    "glm4v_moe": {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}},
    "hy_v4_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
    # K/V-sharing map over layer indices; NVFP4 K/V rounding needs head_dim % 16 == 0
    "kolibri1_1": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "indexed_attention"],
                   "index_layers": [1], "kv_source_layers": [0, 1], "head_dim": 16},
    # SWA layers need head_dim == qk_nope + qk_rope (16), so the indexed layers' rotary fraction grows to 1/2
    "dots3_note": {"head_dim": 16, "rope_parameters": {
        "indexed_attention": {"rope_type": "default", "rope_theta": 80000000.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}}},
    "step3p7": {"sliding_window": 64},  # the full model builds a sliding mask even where the default has no window
    "vitpose_backbone": {"part_features": 8},  # the per-dataset expert slice of the MLP output
    "zaya": {"num_experts_per_tok": 1},  # the only top-k ZAYA supports
    # the talker's text config lacks a field its shared expert reads (the parent talker config supplies it)
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": 48},
}

# model_type -> why the family contributes no block to the zoo (filled by `moe_block_classes`).
SKIPPED: dict[str, str] = {}

# Fields set even where the default config leaves them None (the checkpoint's config.json would give them).
_EVEN_IF_NONE = {"head_dim", "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts",
                 "num_experts_per_tok", "top_k_experts", "moe_intermediate_size", "intermediate_size"}
_RUN_ARGS = {"use_cache": False, "output_router_logits": False, "tie_word_embeddings": False}
_TRANSFORMERS_ROOT = os.path.dirname(transformers.__file__)
_EXPERTS_ASSIGN = re.compile(r"self\.experts\s*=\s*(\w+)\(")


@contextlib.contextmanager
def _quiet():
    """Silence the warnings and transformers log lines that default-config and tiny-model building emits."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _module_source(module_name: str) -> str:
    files = sorted(glob.glob(os.path.join(_TRANSFORMERS_ROOT, "models", module_name, "modeling_*.py")))
    return "".join(open(path, encoding="utf-8").read() for path in files)


def _text_config_class(model_type: str) -> type:
    """The config class of the family's text model (the config class itself for text-only families)."""
    with _quiet():
        return type(CONFIG_MAPPING[model_type]().get_text_config())


def _pick_layers(per_layer: dict[str, list], old_layers: int, new_layers: int) -> list[int]:
    """Indices of the full model's layers to keep: the first layer of each distinct per-layer pattern
    (attention type x MLP type x per-layer overrides ...), then the next layers up to `new_layers`."""
    patterns = [repr([values[i] for values in per_layer.values()]) for i in range(old_layers)]
    picked = [i for i, pattern in enumerate(patterns) if pattern not in patterns[:i]]
    picked += [i for i in range(old_layers) if i not in picked][: max(0, new_layers - len(picked))]
    return sorted(picked)


def _is_layer_index_list(key: str, value: list, num_layers: int) -> bool:
    """A list of layer indices (`moe_layers`, `index_layers`, ...): increasing ints in range(num_layers)."""
    return ("layer" in key and bool(value) and all(type(i) is int and 0 <= i < num_layers for i in value)
            and value == sorted(set(value)))


def _small(key: str, value: Any) -> Any:
    disabled = type(value) is int and value == 0  # e.g. `shared_intermediate_size=0`: no shared expert
    if key in SMALL and isinstance(value, list) and isinstance(SMALL[key], int):  # e.g. per-modality sizes
        return [SMALL[key]] * len(value)
    if key in SMALL and (value is not None or key in _EVEN_IF_NONE) and not disabled:
        return SMALL[key]
    return value


def _keep_relations(small: dict, full: dict, explicit: set = frozenset()) -> None:
    """Keep what the full-size config ties together: multi-head (not grouped) attention stays so, and an MLA
    head_dim keeps its ratio to qk_rope_head_dim (the rotary part)."""
    heads, kv_heads = full.get("num_attention_heads"), full.get("num_key_value_heads")
    if heads and heads == kv_heads and "num_key_value_heads" not in explicit:
        small["num_key_value_heads"] = small.get("num_attention_heads", heads)
    rope, head_dim = full.get("qk_rope_head_dim"), full.get("head_dim")
    if rope and head_dim and "head_dim" not in explicit:
        small["head_dim"] = head_dim * small.get("qk_rope_head_dim", rope) // rope


def _small_layer(layer: dict, kwargs: dict, fields: dict) -> dict:
    """Shrink one layer's overrides in a heterogeneous config (`kwargs`, `fields`: the tiny and full globals)."""
    small = {**kwargs, **{k: _small(k, v) for k, v in layer.items()}}
    _keep_relations(small, {**fields, **layer}, set(layer) - {"num_key_value_heads", "head_dim"})
    return {k: small[k] for k in layer}


def tiny_config(model_type: str, **overrides):
    """The tiny (text) config for `model_type`: `SMALL`, then `OVERRIDES[model_type]`, then `overrides`."""
    config_cls = _text_config_class(model_type)
    with _quiet():
        default = config_cls()
    default.allow_global_per_layer_attribute_access = True  # heterogeneous (per-layer) configs
    fields = dict(vars(default))
    kwargs = {k: _small(k, v) for k, v in fields.items() if _small(k, v) is not v}
    kwargs.update({k: v for k, v in _RUN_ARGS.items() if k in fields})
    kwargs.update(OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    vocab = kwargs.get("vocab_size", fields.get("vocab_size"))
    for i, key in enumerate(("pad_token_id", "bos_token_id", "eos_token_id")):  # special tokens inside the vocab
        value = kwargs.get(key, fields.get(key))
        if vocab and isinstance(value, int) and value >= vocab:
            kwargs[key] = i
        elif vocab and isinstance(value, list):
            kwargs[key] = [v if v < vocab else i for v in value]

    explicit = {*OVERRIDES.get(model_type, {}), *overrides}
    _keep_relations(kwargs, fields, explicit)

    # Depth: keep one layer of each distinct per-layer pattern (unless the depth is given), and cut the per-layer
    # lists (`layer_types`, `mlp_layer_types`, ...) and the layer-index lists (`moe_layers`, ...) to match.
    old_layers = fields.get("num_hidden_layers")
    if old_layers:
        lists = {k: kwargs.get(k, v) for k, v in fields.items() if isinstance(v, list) and k not in explicit}
        index_lists = {k: v for k, v in lists.items() if _is_layer_index_list(k, v, old_layers)}
        per_layer = {k: v for k, v in lists.items() if len(v) == old_layers and k not in index_lists}
        layer_overrides = {int(k): v for k, v in (default.to_dict().get("per_layer_config") or {}).items()}
        patterns = {**per_layer, **{k: [i in v for i in range(old_layers)] for k, v in index_lists.items()}}
        patterns["per_layer_config"] = [layer_overrides.get(i) for i in range(old_layers)]
        if "num_hidden_layers" in explicit:
            picked = list(range(kwargs["num_hidden_layers"]))
        else:
            picked = _pick_layers(patterns, old_layers, kwargs.get("num_hidden_layers", old_layers))
        kwargs["num_hidden_layers"] = len(picked)
        kwargs.update({k: [v[i] for i in picked] for k, v in per_layer.items()})
        kwargs.update({k: [picked.index(i) for i in v if i in picked] for k, v in index_lists.items()})
        if layer_overrides and "per_layer_config" not in explicit:
            kwargs["per_layer_config"] = {new: _small_layer(layer_overrides[old], kwargs, fields)
                                          for new, old in enumerate(picked) if old in layer_overrides}
    with _quiet():
        config = config_cls(**kwargs)
    config._experts_implementation = "eager"  # transformers' reference per-expert loop
    config._attn_implementation = "eager"
    return config


# ---------------------------------------------------------------------------------------------- weights
def _normal(name: str, shape, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.randn(shape, generator=generator) * std


_ROUTER_NAMES = {"gate", "router", "wg", "gating", "gate_network", "classifier", "shared_expert_gate"}


def _is_router(name: str) -> bool:
    """A router/gate weight matrix: a `gate` or `router` module's weight (never `gate_proj`/`gate_up_proj`)."""
    parts = name.split(".")
    return any(p in _ROUTER_NAMES or p.startswith("router") for p in parts[:-1]) or parts[-1] in {
        "router_weight", "gate_weight", "router", "gate"}


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Set every parameter and every persistent floating buffer from a generator seeded by (seed, name).

    Matrices (and 3-D expert tensors) N(0, 0.05); router/gate matrices N(0, 0.3) so routing has no near-ties;
    biases and selection biases (`e_score_correction_bias`, `expert_bias`, ...) N(0, 0.05); other 1-D weights
    around the constant HF initialises them to: norm weights and scales 1 + N(0, 0.1), zero-centred norm
    weights N(0, 0.1), anything else N(0, 0.05). Integer buffers and non-persistent buffers (rotary tables,
    masks: not checkpoint weights) are left alone.
    """
    persistent = set(module.state_dict().keys())
    tensors = [(n, p) for n, p in module.named_parameters()]
    tensors += [(n, b) for n, b in module.named_buffers() if b.is_floating_point() and n in persistent]
    for name, tensor in tensors:
        leaf = name.rsplit(".", 1)[-1]
        if "bias" in leaf:  # biases, and selection biases such as e_score_correction_bias ([E] or [1, E])
            value = _normal(name, tensor.shape, 0.05, seed)
        elif tensor.dim() >= 2:
            std = 0.3 if _is_router(name) and tensor.dim() == 2 else 0.05
            value = _normal(name, tensor.shape, std, seed)
        else:
            init = tensor.float()
            constant = init.numel() > 0 and bool(torch.all(init == init.flatten()[0]))
            centre = float(init.flatten()[0]) if constant else 0.0
            std = 0.1 if centre or "norm" in name else 0.05  # zero-centred norms (weight used as 1 + w) too
            value = centre + _normal(name, tensor.shape, std, seed)
        tensor.copy_(value.to(tensor.dtype))
    return module


# ---------------------------------------------------------------------------------------------- models
def _model_classes(config) -> list[type]:
    """Candidate model classes for a text config: the auto CausalLM, the auto base model, then the module's own."""
    from transformers import AutoModel, AutoModelForCausalLM

    found = []
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            found.append(auto._model_mapping[type(config)])
        except (KeyError, ValueError):
            pass
    module = inspect.getmodule(found[0]) if found else None
    if module is None:
        module = transformers.models.__dict__.get(model_type_to_module_name(config.model_type))
        module = getattr(module, f"modeling_{model_type_to_module_name(config.model_type)}", None)
    if module is not None:
        own = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel) and c.config_class is type(config)
               and not c.__name__.endswith("PreTrainedModel")]
        own.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__))
        found += own
    return list(dict.fromkeys(found))


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """The randomised tiny CausalLM (or base model) for `model_type`, fp32, in eval mode."""
    config = tiny_config(model_type, **overrides)
    classes = _model_classes(config)
    if not classes:
        raise ValueError(f"no model class for {type(config).__name__}")
    error = None
    for cls in classes:
        try:
            with _quiet(), torch.random.fork_rng():  # HF's own init draws from the global RNG: keep it untouched
                torch.manual_seed(seed)
                model = cls._from_config(config, dtype=torch.float32)
            break
        except Exception as exc:  # try the next candidate class
            error = error or exc
    else:
        raise error
    return randomise(model.float(), seed).eval()


# ---------------------------------------------------------------------------------------------- blocks
@dataclass
class ZooBlock:
    model_type: str  # e.g. "mixtral"
    cls: type  # the block class
    block: nn.Module  # a randomised instance in eval mode, fp32 (taken from the tiny model)
    config: Any  # the tiny (text) config it was built with
    hidden_size: int


def _is_experts_module(module: nn.Module) -> bool:
    """transformers' experts modules: `use_experts_implementation` classes, lists/dicts of expert MLPs, `*Experts`."""
    forward_name = getattr(type(module).forward, "__qualname__", "")
    return ("use_experts_implementation" in forward_name or isinstance(module, (nn.ModuleList, nn.ModuleDict))
            or type(module).__name__.endswith("Experts"))


def _is_tower(config_cls: type) -> bool:
    """A multimodal family's vision/audio sub-config (its experts live in the text model)."""
    return "Vision" in config_cls.__name__ or "Audio" in config_cls.__name__


def _families() -> dict[str, list[str]]:
    """modeling module name -> its model_types (top-level first, then text sub-configs), for modules with experts."""
    families: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING.keys():
        families.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    out = {}
    for module_name, types in sorted(families.items()):
        source = _module_source(module_name)
        if "use_experts_implementation" in source or _EXPERTS_ASSIGN.search(source):
            types.sort(key=lambda t: (t.replace("-", "_") != module_name, "text" not in t and "talker" not in t, t))
            out[module_name] = types
    return out


@functools.cache
def moe_block_classes() -> list[ZooBlock]:
    """One `ZooBlock` per distinct MoE block class in the installed transformers (cached).

    Each modeling module's model_types are built in turn (top-level/text configs first) until every experts class
    the module assigns to `self.experts` has been seen. Of several instances of a class, the deepest one is kept
    (early layers are the special ones, e.g. DeepSeek-V4's hash-routed layers).
    """
    blocks: dict[tuple[str, str], ZooBlock] = {}
    SKIPPED.clear()
    for module_name, types in _families().items():
        wanted = set(_EXPERTS_ASSIGN.findall(_module_source(module_name)))  # experts classes not yet seen
        not_experts: dict[str, str] = {}  # `experts` children that are no experts module -> their owner
        seen_configs: set[type] = set()
        failures: dict[str, str] = {}
        for model_type in types:
            if not wanted:
                break
            try:
                config_cls = _text_config_class(model_type)
                if config_cls in seen_configs or (model_type != types[0] and _is_tower(config_cls)):
                    continue
                seen_configs.add(config_cls)
                model = tiny_model(model_type)
            except Exception as exc:
                failures[model_type] = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                continue
            for module in model.modules():
                experts = module._modules.get("experts")
                if experts is None:
                    continue
                if not _is_experts_module(experts):
                    not_experts[type(experts).__name__] = type(module).__name__
                    continue
                wanted.discard(type(experts).__name__)
                key = (type(module).__module__, type(module).__qualname__)
                if key not in blocks or blocks[key].model_type == model_type:
                    blocks[key] = ZooBlock(model_type, type(module), module.eval(), model.config,
                                           int(model.config.hidden_size))
        if wanted:
            SKIPPED.update(failures)
            for cls, owner in not_experts.items():
                SKIPPED.setdefault(types[0], f"{owner} owns `experts` = {cls}, which is no experts module (not a "
                                             "use_experts_implementation class, nor a list of expert MLPs)")
            SKIPPED.setdefault(types[0], f"no model built from {types} has a module owning {sorted(wanted)}")
    return list(blocks.values())


def call_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `block` on `x: [batch, seq, hidden]` and return its hidden-states output, shaped like `x`.

    Blocks return a tensor, or a tuple such as `(hidden, router_logits)`; some flatten to [tokens, hidden] or to 1-D.
    The few blocks that need more than the hidden states get neutral extras: VitPose's per-sample dataset index,
    and, for a whole decoder layer that owns the experts (Gemma 4), identity rotary embeddings, no mask and an
    empty K/V-sharing dict.
    """
    batch, seq, _ = x.shape
    params = inspect.signature(block.forward).parameters
    kwargs: dict[str, Any] = {}
    if "indices" in params:
        kwargs["indices"] = torch.zeros(batch, dtype=torch.long, device=x.device)
    if "position_embeddings" in params:
        head_dim = block.self_attn.head_dim
        kwargs["position_embeddings"] = (x.new_ones(batch, seq, head_dim), x.new_zeros(batch, seq, head_dim))
    if "shared_kv_states" in params:
        kwargs["shared_kv_states"] = {}
    if "per_layer_input" in params and getattr(block, "hidden_size_per_layer_input", 0):
        kwargs["per_layer_input"] = x.new_zeros(batch, seq, block.hidden_size_per_layer_input)
    out = block(x, **kwargs)
    tensors = list(_tensors(out))
    for tensor in tensors:
        if tensor.shape == x.shape:
            return tensor
    for tensor in tensors:
        if tensor.numel() == x.numel():
            return tensor.reshape(x.shape)
    raise ValueError(f"{type(block).__name__} returned no tensor of shape {tuple(x.shape)}")


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)


if __name__ == "__main__":  # python tests/hf_zoo.py: list the zoo
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    zoo = moe_block_classes()
    print(f"{len(zoo)} block classes in {time.perf_counter() - start:.1f}s")
    for zb in zoo:
        print(f"  {zb.model_type:32s} {zb.cls.__name__}")
    print(f"{len(SKIPPED)} skipped")
    for model_type, reason in SKIPPED.items():
        print(f"  {model_type:32s} {reason}")
