"""Read a transformers MoE block into a moekit config and state dict, through its family (`moekit.families`).

A block is recognised by its exact class (`moekit.families.block_family`), never by the attributes it happens to
have: a look-alike block of another family (other scores, biases, groups...) would be read wrong. Its routing
settings come from the family's `block_config`, its tensors through the family's tensor map, strictly (every
tensor of the block used, every parameter of the moekit layer filled). transformers itself is not imported.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import MoEConfig


def config_and_state_from_hf(module: nn.Module) -> tuple[MoEConfig, dict[str, Tensor]]:
    """Map a transformers MoE block to (`MoEConfig`, state dict for `MoELayer`).

    Raises:
        ValueError: the block's class is not one moekit reads natively (the message names it and the supported
            ones), or it holds a setting or tensor the family's moekit layer cannot compute exactly.
    """
    from ..families import block_classes_text, block_family
    from ..families.tensor_map import block_state

    cls = type(module)
    family = block_family(module)
    if family is None:
        raise ValueError(f"from_hf: {cls.__name__} is not a supported MoE block ({cls.__module__}): moekit "
                         f"computes exactly {block_classes_text()} (the blocks of its native families); load other "
                         "families' models with transformers itself")
    where = f"from_hf: {cls.__name__}"
    try:
        config = family.block_config(module)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    return config, block_state(family, config, module.state_dict(), where)
