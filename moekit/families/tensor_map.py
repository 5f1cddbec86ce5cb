"""Runs a family's tensor map: transformers checkpoints or blocks into moekit state dicts, and moekit tensors out.

Three directions, one set of names (a family's `block_names`, `block_transforms`, `hf_block` and `expert_files`):

- `load_state`: a checkpoint's tensors (per-expert or fused experts) -> the state dict of `MoETransformer(config)`;
  strict: every moekit tensor filled with the right shape, every checkpoint tensor used (the family's
  `ignorable_tensors` and layers past the model's, such as multi-token-prediction layers, excepted).
- `block_state` (in `moekit.families.block_map`, which needs neither the model nor the layer module): a
  transformers MoE block's `state_dict()` -> the state dict of `MoELayer(moe)`, equally strict.
- `export_tensors`: moekit tensors (read on demand from a `StateSource`) -> the checkpoint's tensors under the
  family's on-disk names, each made only when written (per-expert files take one expert's slice at a time).

moekit's names are transformers' (``model.`` + name, ``lm_head.weight`` as is) except inside MoE blocks, where
the family's `block_names` apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from .base import Family, StateSource, Transform
from .block_map import TensorPool, fill

__all__ = ["MLP_TENSOR_NAME", "HFTensor", "export_tensors", "hf_name", "load_state", "moekit_shapes"]

_EXPERT_STACKS = ("experts.gate_up_proj", "experts.down_proj")
MLP_TENSOR_NAME = re.compile(r"layers\.(\d+)\.mlp\.(.+)")
"""moekit's name of a tensor in a layer's MLP block, ``layers.<layer>.mlp.<rest>``: group 1 the layer, 2 the rest."""


@dataclass
class HFTensor:
    """One checkpoint tensor to write: its on-disk name, shape, whether it stays float32, and how to make it."""

    name: str
    shape: tuple[int, ...]
    float32: bool
    make: Callable[[], Tensor]


def _meta_state(module_factory: Callable[[], torch.nn.Module]) -> dict[str, Tensor]:
    with torch.device("meta"):
        return module_factory().state_dict()


def moekit_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of `MoETransformer(config)`'s state dict (a tied `lm_head` left out) and its shape."""
    from ..model.transformer import MoETransformer

    state = _meta_state(lambda: MoETransformer(config))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tuple(t.shape) for name, t in state.items()}


def hf_name(family: Family, config: ModelConfig, name: str) -> tuple[str, Transform | None]:
    """The transformers name (in memory: fused experts, `hf_block`) of moekit's tensor `name`, and its transform.

    Raises:
        ValueError: the family has no tensor for it (a feature it cannot hold).
    """
    match = MLP_TENSOR_NAME.fullmatch(name)
    if match and config.is_moe_layer(int(match[1])):
        rest = match[2]
        if rest not in family.block_names:
            raise ValueError(f"{family.model_type} has no tensor for moekit's {name!r}")
        hf = f"model.layers.{match[1]}.{family.hf_block}.{family.block_names[rest]}"
        return hf, family.block_transforms.get(rest)
    if match:
        return f"model.layers.{match[1]}.{family.hf_block}.{match[2]}", None
    if name == "lm_head.weight":
        return name, None
    return f"model.{name}", None


def _disk_name(family: Family, name: str, moe_layer: bool) -> str:
    """Where the in-memory name `name` lives on disk (Mixtral's MoE blocks sit under `block_sparse_moe`)."""
    files = family.expert_files
    if not moe_layer or files is None or files.block == family.hf_block:
        return name
    return name.replace(f".{family.hf_block}.", f".{files.block}.", 1)


# ================================================================================================ load
def load_state(family: Family, config: ModelConfig, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The state dict of `MoETransformer(config)` from a `family` checkpoint's tensors (see the module docstring).

    Raises:
        ValueError: a missing, misshapen or unexpected tensor, named.
    """
    pool = TensorPool(tensors, where, family.model_type)
    if "model.embed_tokens.weight" not in pool.tensors and "embed_tokens.weight" in pool.tensors:  # a base model
        pool.tensors = {n if n.startswith("lm_head.") else f"model.{n}": t for n, t in pool.tensors.items()}
    files = family.expert_files
    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            continue
        assert config.moe is not None
        memory = f"model.layers.{i}.{family.hf_block}."
        disk = _disk_name(family, memory, True)
        if files is not None and disk != memory:  # Mixtral's block_sparse_moe: move under the in-memory name
            for name in [n for n in pool.tensors if n.startswith(disk)]:
                pool.tensors[memory + name[len(disk):]] = pool.tensors.pop(name)
        pool.fuse_experts(family, memory, config.moe.num_local_experts)
    if config.tie_word_embeddings:
        pool.drop("lm_head.weight", must_be_zero=False, why="")
    state = fill(pool, moekit_shapes(config), lambda name: hf_name(family, config, name), where)
    for name, must_be_zero in family.ignorable_tensors(config).items():
        pool.drop(name, must_be_zero, "moekit's model for this config has no place for it")
    leftover = pool.leftovers(config.num_hidden_layers)
    if leftover:
        raise ValueError(f"{where}: tensor {leftover[0]!r} has no place in the moekit model built from this "
                         f"{family.model_type} config ({len(leftover)} unexpected tensor(s))")
    return state


# ================================================================================================ export
def export_tensors(family: Family, config: ModelConfig, source: StateSource) -> list[HFTensor]:
    """Every tensor of a `family` checkpoint of `config`, under its on-disk names, made from `source` on demand.

    Per-expert layouts get one tensor per expert projection (made from one expert's slice); the selection bias
    stays float32, as transformers keeps it.
    """
    out: list[HFTensor] = []
    files = family.expert_files
    for name, shape in moekit_shapes(config).items():
        memory, transform = hf_name(family, config, name)
        match = MLP_TENSOR_NAME.fullmatch(name)
        moe_layer = bool(match) and config.is_moe_layer(int(match[1]))
        disk = _disk_name(family, memory, moe_layer)
        stack = match[2] if moe_layer and match[2] in _EXPERT_STACKS else None
        if stack is not None and files is not None:
            assert transform is None, "per-expert files of transformed experts are not described"
            out += _per_expert(disk, name, shape, stack, files, source)
            continue
        hf_shape = shape
        if transform is not None:
            with torch.device("meta"):
                hf_shape = tuple(transform.to_hf(torch.empty(shape)).shape)

        def make(name: str = name, transform: Transform | None = transform) -> Tensor:
            tensor = source.get(name)
            return tensor if transform is None else transform.to_hf(tensor)

        out.append(HFTensor(disk, hf_shape, name.endswith("e_score_correction_bias"), make))
    for memory, (shape, make) in family.extra_tensors(config).items():
        match = re.match(r"model\.layers\.(\d+)\.", memory)
        moe_layer = bool(match) and config.is_moe_layer(int(match[1]))
        out.append(HFTensor(_disk_name(family, memory, moe_layer), shape, False, make))
    return out


def _per_expert(disk: str, name: str, shape: tuple[int, ...], stack: str, files, source: StateSource) -> list[HFTensor]:
    base = disk[: -len(stack)]  # "model.layers.{i}.{block}."
    num_experts = shape[0]
    out = []
    for e in range(num_experts):
        if stack == "experts.gate_up_proj":
            inner = shape[1] // 2
            out.append(HFTensor(f"{base}experts.{e}.{files.gate}.weight", (inner, shape[2]), False,
                                lambda e=e, inner=inner: source.get_expert(name, e)[:inner]))
            out.append(HFTensor(f"{base}experts.{e}.{files.up}.weight", (inner, shape[2]), False,
                                lambda e=e, inner=inner: source.get_expert(name, e)[inner:]))
        else:
            out.append(HFTensor(f"{base}experts.{e}.{files.down}.weight", tuple(shape[1:]), False,
                                lambda e=e: source.get_expert(name, e)))
    return out
