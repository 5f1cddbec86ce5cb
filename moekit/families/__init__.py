"""One module per Hugging Face architecture moekit reads and writes natively (see `moekit.families.base`).

`FAMILIES` maps `model_type` to its family; `family_of(config_json)` finds one or refuses with the list;
`block_family(module)` recognises a transformers MoE block by its exact class. Adding a family is one module here
(plus its tests) and one line in `_MODULES`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import Family

_MODULES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe",
            "deepseek_v3", "gpt_oss")

FAMILIES: dict[str, Family] = {name: import_module(f".{name}", __name__).FAMILY for name in _MODULES}
"""Every native family by `model_type`."""

MOE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.is_moe)
DENSE_FAMILIES = tuple(name for name, family in FAMILIES.items() if not family.is_moe)

#: MoE families transformers implements that moekit does not convert natively (refused with this hint)
_THROUGH_TRANSFORMERS = ("llama4", "granitemoe", "granitemoeshared", "granitemoehybrid", "phimoe", "dbrx", "minimax",
                         "minimax_m2", "qwen3_next", "deepseek_v2", "jamba", "jetmoe", "ernie4_5_moe", "hunyuan_v1_moe",
                         "dots1", "glm4v_moe", "qwen3_vl_moe", "qwen3_omni_moe", "flex_olmo", "exaone_moe",
                         "deepseek_v32", "mistral4", "longcat_flash", "bailing_moe")


MOE_TYPES = (*MOE_FAMILIES, *_THROUGH_TRANSFORMERS)
"""Every MoE `model_type` moekit knows of (natively read or not)."""


def supported_text() -> str:
    """The native families, for messages."""
    return (f"moekit reads and writes {', '.join(MOE_FAMILIES)} (MoE) and {', '.join(DENSE_FAMILIES)} (dense) "
            "checkpoints natively")


def family_for(model_type: Any, where: str = "config.json") -> Family:
    """The family of `model_type`, or a ValueError naming it and the supported ones."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    hint = ""
    if model_type in _THROUGH_TRANSFORMERS:
        hint = (" (a transformers MoE family moekit does not convert; it can be loaded with transformers itself, "
                "AutoModelForCausalLM)")
    raise ValueError(f"{where}: model_type={model_type!r} is not supported{hint}; {supported_text()}")


def block_family(block: Any) -> Family | None:
    """The family whose transformers MoE block class `block` is an instance of (exactly, not a subclass), or None."""
    name = f"{type(block).__module__}.{type(block).__qualname__}"
    for family in FAMILIES.values():
        if name in family.block_classes:
            return family
    return None


def block_classes_text() -> str:
    """The transformers block classes moekit reads, for messages."""
    return ", ".join(cls.rsplit(".", 1)[1] for family in FAMILIES.values() for cls in family.block_classes)


__all__ = ["DENSE_FAMILIES", "FAMILIES", "MOE_FAMILIES", "MOE_TYPES", "Family", "block_classes_text", "block_family",
           "family_for", "supported_text"]
