"""Loading a transformers MoE model from a folder with moekit's experts, and saying where they do not apply."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .experts import IMPLEMENTATIONS, is_interface_experts, register


def unserved_experts(model: nn.Module) -> list[str]:
    """Class names of the modules named `experts` that transformers' experts interface does not dispatch.

    moekit's experts implementation cannot run these (Llama 4's and DBRX's experts are plain modules): they keep
    transformers' own code whatever `experts_implementation` says.
    """
    names = {type(module).__name__ for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] == "experts" and not is_interface_experts(module)}
    return sorted(names)


def warn_unserved(model: nn.Module, implementation: str) -> list[str]:
    """Warn once, naming the classes, when `implementation` is moekit's and some experts cannot use it."""
    unserved = unserved_experts(model)
    if unserved and implementation in IMPLEMENTATIONS:
        warnings.warn(f"experts_implementation={implementation!r}: {', '.join(unserved)} in "
                      f"{type(model).__name__} do not use transformers' experts interface, so they run "
                      "transformers' own code (the results are the family's; moekit's backends do not apply)",
                      stacklevel=3)
    return unserved


def load_model(path: str | Path, experts_implementation: str = "moekit", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` with moekit's experts, on `device`, offline.

    Warns (once, naming the classes) when the family's experts cannot take the implementation. Errors from
    transformers name the folder.
    """
    from transformers import AutoModelForCausalLM

    register()
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(path), experts_implementation=experts_implementation, dtype=dtype, local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: transformers cannot load it as a causal LM ({error})") from error
    problems = [(what, sorted(loading.get(key) or [])) for what, key in (
        ("weights the checkpoint lacks (transformers would initialise them at random)", "missing_keys"),
        ("tensors the model does not use", "unexpected_keys"),
        ("tensors of the wrong shape", "mismatched_keys"))]
    problems = [(what, names) for what, names in problems if names]
    if problems:
        what, names = problems[0]
        shown = ", ".join(str(name) for name in names[:3]) + (" ..." if len(names) > 3 else "")
        raise ValueError(f"{path}: its weights do not fit transformers' {type(model).__name__} (the class its "
                         f"config.json names): {len(names)} {what}: {shown}; the folder's config.json and "
                         "weights belong to different models")
    warn_unserved(model, experts_implementation)
    return model.to(device)
