"""Checkpoint tensors taken by name, and a transformers MoE block read into a moekit layer's state.

`TensorPool` holds a checkpoint's (or a block's) tensors: each is taken once, per-expert layouts are fused into the
stacked tensors moekit holds, and what is left over is an error. `block_state` runs a family's block map on one
transformers MoE block; it needs neither moekit's model nor its layer module (the caller gives the layer's shapes),
so `MoELayer.from_hf` can use it without an import cycle. `moekit.families.tensor_map` runs whole checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import MoEConfig
from .base import Family, Transform

__all__ = ["TensorPool", "block_state", "fill"]


class TensorPool:
    """Checkpoint tensors by name; each may be taken once."""

    def __init__(self, tensors: dict[str, Tensor], where: str, model_type: str) -> None:
        self.tensors, self.where, self.model_type = dict(tensors), where, model_type

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ValueError(f"{self.where}: tensor {name!r} is missing; a {self.model_type} checkpoint with this "
                             "config has it (is the checkpoint complete?)")
        return self.tensors.pop(name)

    def drop(self, name: str, must_be_zero: bool, why: str) -> None:
        tensor = self.tensors.pop(name, None)
        if must_be_zero and tensor is not None and tensor.numel() and bool(tensor.ne(0).any()):
            raise ValueError(f"{self.where}: tensor {name!r} is nonzero, and {why}, so this checkpoint cannot be "
                             "read exactly")

    def fuse_experts(self, family: Family, prefix: str, num_experts: int) -> None:
        """Per-expert tensors under `prefix` (``...experts.{e}.gate_proj.weight``) -> the fused pair, in place."""
        files = family.expert_files
        if files is None or f"{prefix}experts.0.{files.gate}.weight" not in self.tensors:
            return
        gate_up, down = [], []
        for e in range(num_experts):
            gate = self.take(f"{prefix}experts.{e}.{files.gate}.weight")
            up = self.take(f"{prefix}experts.{e}.{files.up}.weight")
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(self.take(f"{prefix}experts.{e}.{files.down}.weight"))
        self.tensors[f"{prefix}experts.gate_up_proj"] = torch.stack(gate_up)
        self.tensors[f"{prefix}experts.down_proj"] = torch.stack(down)

    def leftovers(self, num_layers: int | None) -> list[str]:
        left = []
        for name in self.tensors:
            match = re.match(r"model\.layers\.(\d+)\.", name)
            if num_layers is not None and match and int(match[1]) >= num_layers:
                continue  # layers past the model's (multi-token prediction) are not part of the LM
            if name.endswith("rotary_emb.inv_freq"):
                continue
            left.append(name)
        return left


def fill(pool: TensorPool, shapes: dict[str, tuple[int, ...]], names: Callable[[str], tuple[str, Transform | None]],
          where: str) -> dict[str, Tensor]:
    state = {}
    for name, shape in shapes.items():
        source, transform = names(name)
        tensor = pool.take(source)
        if transform is not None:
            tensor = transform.to_moekit(tensor)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{where}: tensor {source!r} has shape {tuple(tensor.shape)}, but this config needs "
                             f"{shape} for moekit's {name!r}")
        state[name] = tensor
    return state


def block_state(family: Family, moe: MoEConfig, tensors: dict[str, Tensor], where: str,
                shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The state dict of `MoELayer(moe)` (its tensors' `shapes`) from a transformers MoE block's `state_dict()`.

    Strict both ways: every tensor of the layer filled with the right shape, every tensor of the block used (the
    family's `ignorable_block_tensors` excepted); per-expert blocks (transformers 4.x) are fused first.
    """
    pool = TensorPool(tensors, where, family.model_type)
    pool.fuse_experts(family, "", moe.num_local_experts)

    def names(name: str) -> tuple[str, Transform | None]:
        if name not in family.block_names:
            raise ValueError(f"{where}: {family.model_type} blocks have no tensor for moekit's {name!r}")
        return family.block_names[name], family.block_transforms.get(name)

    state = fill(pool, shapes, names, where)
    for name, must_be_zero in family.ignorable_block_tensors(moe).items():
        pool.drop(name, must_be_zero, "moekit's layer for this block has no place for it")
    leftover = pool.leftovers(None)
    if leftover:
        raise ValueError(f"{where}: the block's tensor {leftover[0]!r} has no place in moekit's MoELayer "
                         f"({len(leftover)} unexpected tensor(s)), so the layer would not compute the block")
    return state
