"""Tutel (microsoft/tutel) as a row of `moekit bench layer`, where it is installed.

Tutel is not on PyPI; it builds from source (``NO_CUDA=1 pip install --no-build-isolation .`` in a clone gives
the CPU build). When ``import tutel`` works, the layer benchmark adds a ``tutel`` row: Tutel's `moe_layer` with
its top-k softmax gate (renormalised over the k kept experts, scores applied after the experts), dropless
(``capacity_factor=0``: every expert's capacity is the largest group) and its SwiGLU experts
(``llama_ffn``: silu(x W1) * (x W2) W3), which is the function moekit's Mixtral-style layer computes, so the
benchmark's equality checks (outputs and every gradient) hold. It has no shared expert; for the DeepSeek-like
config the harness adds a dense SwiGLU FFN beside it (`layer.WithShared`), as it does for transformers' block.

Only this module imports tutel, lazily.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import MoELayer

INSTALL_HINT = ("tutel is not installed; it is not on PyPI: clone github.com/microsoft/tutel and run "
                "`NO_CUDA=1 pip install --no-build-isolation .` there (CPU build) to add its rows")


def load_tutel() -> ModuleType | None:
    """`tutel.moe`, or None when tutel is not installed (or its extension does not load on this machine)."""
    try:
        from tutel import moe
    except Exception:  # ImportError, or a compiled extension that does not load here
        return None
    return moe


def _expert_weights(moe: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Tutel's flat `llama_ffn` parameters viewed at their full shapes: W1, W2 [E, H, I] and W3 [E, I, H]."""
    experts = moe.experts
    return (experts.W_fc1.view(experts.W_fc1_full_shape), experts.W_fc2.view(experts.W_fc2_full_shape),
            experts.W_fc3.view(experts.W_fc3_full_shape))


def build_tutel(tutel_moe: ModuleType, layer: MoELayer) -> nn.Module:
    """Tutel's layer (eval mode) holding `layer`'s routed experts and router (a top-k softmax MoELayer with SwiGLU
    experts); the shared expert, if any, is not part of it.

    moekit's `gate_up_proj` [E, 2I, H] (gate rows, then up rows) becomes W1 = gate^T and W2 = up^T [E, H, I];
    `down_proj` [E, H, I] becomes W3 = down^T [E, I, H]; the router weight [E, H] is Tutel's gate `wg`.
    """
    config = layer.config
    if config.router != "topk" or config.scoring_func != "softmax" or not config.resolved_norm_topk_prob:
        raise ValueError("build_tutel: Tutel's top-k gate is softmax with the kept weights renormalised; the layer "
                         f"has router={config.router!r}, scoring_func={config.scoring_func!r}")
    moe = tutel_moe.moe_layer(
        gate_type={"type": "top", "k": config.num_experts_per_tok, "capacity_factor": 0.0, "fp32_gate": True},
        experts={"type": "llama_ffn", "num_experts_per_device": config.num_local_experts,
                 "hidden_size_per_expert": config.moe_intermediate_size, "activation_fn": F.silu},
        model_dim=config.hidden_size)
    inner = config.moe_intermediate_size
    w1, w2, w3 = _expert_weights(moe)
    with torch.no_grad():
        moe.gates[0].wg.weight.copy_(layer.router.weight)
        gate_up = layer.experts.gate_up_proj
        w1.copy_(gate_up[:, :inner].transpose(1, 2))
        w2.copy_(gate_up[:, inner:].transpose(1, 2))
        w3.copy_(layer.experts.down_proj.transpose(1, 2))
    return moe.eval()


def tutel_grads(moe: nn.Module) -> dict[str, Tensor | None]:
    """The Tutel layer's gradients in moekit's layouts, under the layer benchmark's names (router, gate_up, down)."""
    w1, w2, w3 = _expert_weights(moe)
    experts = moe.experts

    def grad_of(param: Tensor, shape: torch.Size) -> Tensor | None:
        return None if param.grad is None else param.grad.view(shape)

    g1, g2, g3 = (grad_of(experts.W_fc1, w1.shape), grad_of(experts.W_fc2, w2.shape),
                  grad_of(experts.W_fc3, w3.shape))
    return {
        "router": moe.gates[0].wg.weight.grad,
        "gate_up": None if g1 is None or g2 is None else torch.cat([g1, g2], dim=2).transpose(1, 2),
        "down": None if g3 is None else g3.transpose(1, 2),
    }
