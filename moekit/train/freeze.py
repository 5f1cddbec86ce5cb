"""What trains: `train.freeze_router`, `train.train_only_router` and `train.freeze` (name regexes), either backend."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..layer import MoELayer
from .config import split_patterns


def router_parameter_names(model: nn.Module) -> list[str]:
    """The names of every router's weights: moekit's `MoELayer.router`, or transformers' routers (`HFCausalLM`)."""
    if hasattr(model, "router_parameter_names"):
        return model.router_parameter_names()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            names += [f"{name}.router.{param}" for param, _ in module.router.named_parameters()]
    return names


def apply_freezing(model: nn.Module, train: Any) -> list[str]:
    """Set `requires_grad=False` on the parameters `train` freezes; returns their names (in model order).

    `freeze_router` freezes every router's weights (a selection bias is a buffer and still follows its update
    rule), `train_only_router` everything else, and `freeze` (comma-separated regexes, `re.search` on the
    parameter name) whatever matches. Raises ValueError when a pattern matches nothing, when nothing would be left
    to train, or when a router setting is asked of a model without routers.
    """
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    if train.freeze_router or train.train_only_router:
        routers = set(router_parameter_names(model))
        if not routers:
            setting = "freeze_router" if train.freeze_router else "train_only_router"
            raise ValueError(f"train.{setting}=true, but this model has no router (it is dense)")
        frozen |= routers if train.freeze_router else set(names) - routers
    for pattern in split_patterns(train.freeze or ""):
        matched = {name for name in names if re.search(pattern, name)}
        if not matched:
            raise ValueError(f"train.freeze: the pattern {pattern!r} matches no parameter name (they look like "
                             f"{names[0]!r}); `moekit info` lists the model's parameters")
        frozen |= matched
    if frozen and frozen >= set(names):
        raise ValueError("train.freeze / freeze_router / train_only_router freeze every parameter: nothing would "
                         "train")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return [name for name in names if name in frozen]
