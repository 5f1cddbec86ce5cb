"""Behaviour several MoE families share: softmax routing's export, and reading transformers' MoE blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from .base import Family, MappedSource, StateSource
from .config_io import moe_layers
from .equivalence import canonical

if TYPE_CHECKING:
    from torch import Tensor, nn


def replace_moe(config: ModelConfig, **changes: Any) -> ModelConfig:
    assert config.moe is not None
    return dataclasses.replace(config, moe=config.moe.replace(**changes))


def zero_selection_bias(config: ModelConfig, source: StateSource, family: str) -> None:
    """Refuse a nonzero aux-free selection bias for a family that has none (a zero one selects nothing)."""
    assert config.moe is not None
    if not config.moe.uses_aux_free_bias:
        return
    nonzero = [i for i in moe_layers(config)
               if bool(source.get(f"layers.{i}.mlp.router.e_score_correction_bias").ne(0).any())]
    if nonzero:
        raise ValueError(f"{family} has no selection bias (e_score_correction_bias), which is nonzero in layers "
                         f"{nonzero}")


class SoftmaxMoE(Family):
    """MoE families whose router is a softmax top-k (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS).

    They have no selection bias (a zero one is dropped; a nonzero one refused) and no `routed_scaling_factor`:
    moekit's factor multiplies every routed expert's output, so it is folded into the experts' `down_proj` (and
    its bias) on export and taken out again by `restore`.
    """

    def export_config(self, config: ModelConfig) -> ModelConfig:
        config = canonical(config)
        if config.moe is None:
            return config
        return replace_moe(config, aux_free_bias_update_rate=0.0, routed_scaling_factor=1.0)

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        moe = config.moe
        if moe is None:
            return source
        zero_selection_bias(config, source, self.architecture)
        factor = moe.routed_scaling_factor
        if factor == 1.0:
            return source
        change = {}
        for i in moe_layers(config):
            change[f"layers.{i}.mlp.experts.down_proj"] = lambda t: t.float() * factor
            if moe.expert_bias:
                change[f"layers.{i}.mlp.experts.down_proj_bias"] = lambda t: t.float() * factor
        return MappedSource(source, change)

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        moe = stored.moe
        if moe is None:
            return state
        import torch

        state = dict(state)
        for i in moe_layers(stored):
            layer = f"layers.{i}.mlp"
            if moe.routed_scaling_factor != 1.0:
                for name in (f"{layer}.experts.down_proj", f"{layer}.experts.down_proj_bias"):
                    if name in state:
                        state[name] = (state[name].float() / moe.routed_scaling_factor).to(state[name].dtype)
            if moe.uses_aux_free_bias:
                state[f"{layer}.router.e_score_correction_bias"] = torch.zeros(moe.num_local_experts)
        return state


def block_expert_dims(block: nn.Module, fused: str = "experts.gate_up_proj", per_expert: str = "gate_proj",
                      transposed: bool = False) -> tuple[int, int, int]:
    """(experts, hidden, expert width) of a transformers MoE block, fused (transformers 5) or per expert (4.x)."""
    state = block.state_dict()
    if fused in state:
        experts, a, b = state[fused].shape
        hidden, two_i = (a, b) if transposed else (b, a)
        return experts, hidden, two_i // 2
    count = 0
    while f"experts.{count}.{per_expert}.weight" in state:
        count += 1
    if count == 0:
        raise ValueError(f"{type(block).__name__}: no expert tensors found ({fused} or experts.0.{per_expert}.weight)")
    inner, hidden = state[f"experts.0.{per_expert}.weight"].shape
    return count, hidden, inner


def silu_act(module: object, what: str) -> None:
    """Refuse an activation other than SiLU (moekit's SwiGLU) for `what` ("expert", "shared expert")."""
    name = type(module).__name__.lower()
    if "silu" not in name and "swish" not in name:
        raise ValueError(f"the {what} activation {type(module).__name__} is not supported; moekit's gated experts "
                         "use SiLU (SwiGLU)")


def zero_width_mlp(prefix: str, hidden: int) -> dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]]:
    """The tensors of a width-0 SwiGLU MLP at `prefix` (``...shared_expert``): what transformers builds for a
    missing shared expert (its output is exactly 0)."""
    import torch

    return {f"{prefix}.gate_proj.weight": ((0, hidden), lambda: torch.zeros(0, hidden)),
            f"{prefix}.up_proj.weight": ((0, hidden), lambda: torch.zeros(0, hidden)),
            f"{prefix}.down_proj.weight": ((hidden, 0), lambda: torch.zeros(hidden, 0))}


def experts_activation(experts: nn.Module) -> object:
    """The activation module of a transformers experts module (fused, or a 4.x list of expert MLPs)."""
    if hasattr(experts, "act_fn"):
        return experts.act_fn
    first = experts[0] if len(experts) else None
    return getattr(first, "act_fn", None)
