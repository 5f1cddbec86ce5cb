"""Read a transformers MoE block into a moekit config and state dict, through its family (`moekit.families`).

A block is recognised by its exact class (`moekit.families.block_family`), never by the attributes it happens to
have: a look-alike block of another family (other scores, biases, groups...) would be read wrong. Its routing
settings come from the family's `block_config`, its tensors through the family's block map, strictly (every
tensor of the block used, every parameter of the moekit layer filled). transformers itself is not imported.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..config import MoEConfig


def read_block(module: nn.Module) -> tuple[Any, MoEConfig]:
    """(the family, the `MoEConfig`) of a transformers MoE block.

    Raises:
        ValueError: the block's class is not one moekit reads natively (the message names it and the supported
            ones), or it holds a setting the family's moekit layer cannot compute exactly.
    """
    from ..families import block_classes_text, block_family

    cls = type(module)
    family = block_family(module)
    if family is None:
        raise ValueError(f"from_hf: {cls.__name__} is not a supported MoE block ({cls.__module__}): moekit "
                         f"computes exactly {block_classes_text()} (the blocks of its native families); load other "
                         "families' models with transformers itself")
    try:
        return family, family.block_config(module)
    except ValueError as error:
        raise ValueError(f"from_hf: {cls.__name__}: {error}") from error


def block_tensors(family: Any, config: MoEConfig, module: nn.Module,
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The block's tensors as the state dict of a moekit layer whose tensors have `shapes` (strict both ways)."""
    from ..families.block_map import block_state

    return block_state(family, config, module.state_dict(), f"from_hf: {type(module).__name__}", shapes)
