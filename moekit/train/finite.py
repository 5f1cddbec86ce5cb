"""The non-finite guard: which value of a step or of the training state is not finite, the router counts a skipped
step must not leave behind, and the message that stops a run that diverged (`NonFiniteTraining`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..layer import MoELayer

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["discard_router_loads", "diverged_message", "nonfinite_state", "nonfinite_step_value"]


def nonfinite_step_value(loss: float, aux_loss: float, grad_norm: float) -> str | None:
    """What of a step is not finite ("the loss is nan"...), or None."""
    return next((f"{name} is {value}" for name, value in (("the loss", loss), ("the aux loss", aux_loss),
                                                          ("the gradient norm", grad_norm))
                 if not math.isfinite(value)), None)


def nonfinite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, param_names: list[str]) -> str | None:
    """The first weight or optimiser moment that is not finite, or None (`param_names`: the optimiser's order)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"weight {name}"
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0 \
                    and not bool(torch.isfinite(value).all()):
                index = next((i for i, p in enumerate(flat) if p is param), 0)
                return f"optimiser {key} of {param_names[index]}"
    return None


def discard_router_loads(model: torch.nn.Module) -> None:
    """Forget the router counts gathered since the last selection-bias update (moekit's or transformers' model)."""
    if hasattr(model, "discard_router_loads"):
        model.discard_router_loads()
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.load_since_update.zero_()


def diverged_message(what: str, train: TrainConfig, saved_step: int | None, run_dir: Path) -> str:
    """Why training stopped (`what` was not finite), what was kept, and the settings that may help."""
    kept = (f"the last checkpoint (step {saved_step}) is kept in {run_dir}" if saved_step
            else "no checkpoint had been written yet")
    return (f"training stopped: {what}; nothing of this step was saved, {kept}. The run diverged: try a lower "
            f"train.lr (now {train.lr:g}), a smaller train.grad_clip (now {train.grad_clip:g}), more "
            f"train.warmup_steps (now {train.warmup_steps}), train.dtype=float32, or let a few bad steps be "
            f"skipped with train.max_skipped_steps=N (now {train.max_skipped_steps})")
