"""moekit's expert backends as transformers experts implementations (`experts_implementation="moekit"`).

transformers 5 computes the experts of most MoE families through one registry: an experts module decorated with
`use_experts_implementation` looks `config._experts_implementation` up in `ExpertsInterface` and calls the entry
as `fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. The decorator sets
the layout flags on the module (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`,
`has_post_expert_norm`) and gives it `_apply_gate` (the family's gated activation) and `act_fn`.

:func:`experts_forward` groups the assignments by expert with moekit's dispatch and runs them one of two ways:

- **stacked** (`moekit.layer.experts.stacked_experts`, with the hand-written backwards): experts without biases
  or a post-expert norm whose activation is exactly SwiGLU on concatenated `[gate; up]` rows (the decorator's
  default `_apply_gate` with SiLU) or exactly GELU (no gate). Transposed weights are passed as views.
- **general**: anything else (biases, a family's own `_apply_gate` such as GPT-OSS's interleaved clamped
  SwiGLU, other activations, `post_expert_norm`) runs the module's own functions on each busy expert's rows
  under plain autograd, so it computes what the family defines.

Both combine with one scatter-add into token order. Expert-parallel modules (`_is_expert_parallel`, sentinel
expert ids) are refused: moekit's expert parallelism is its own (`moekit.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer.dispatch import plan_dispatch
from ..layer.experts import stacked_experts

#: the registered names and the moekit backend each runs ("auto" chooses per call, as moekit's own layers do)
IMPLEMENTATIONS: dict[str, str] = {
    "moekit": "auto",
    "moekit_loop": "loop",
    "moekit_grouped_mm": "grouped_mm",
    "moekit_bmm": "bmm",
}

_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def is_interface_experts(module: nn.Module) -> bool:
    """True for an experts module built by transformers' `use_experts_implementation` decorator."""
    return all(hasattr(module, flag) for flag in _LAYOUT_FLAGS) and hasattr(module, "_is_expert_parallel")


def stacked_kind(module: nn.Module) -> bool | None:
    """True (SwiGLU) or False (GELU) when moekit's stacked experts compute `module` exactly; None otherwise."""
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    if module.has_bias or module.has_post_expert_norm:
        return None
    act = getattr(module, "act_fn", None)
    if module.has_gate:
        default_gate = getattr(type(module), "_apply_gate", None) is _default_apply_gate
        silu = type(act) in (nn.SiLU, SiLUActivation)
        return True if default_gate and module.is_concatenated and silu else None
    gelu = (type(act) is GELUActivation and act.act is F.gelu) or (type(act) is nn.GELU and act.approximate == "none")
    return False if gelu else None


def _weights(module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(in_proj [E, 2I or I, H], down_proj [E, H, I], in bias, out bias) as views of the module's tensors."""
    in_proj = module.gate_up_proj if module.has_gate else module.up_proj
    down_proj = module.down_proj
    if module.is_transposed:  # stored [E, H, 2I] and [E, I, H]
        in_proj, down_proj = in_proj.transpose(1, 2), down_proj.transpose(1, 2)
    if not module.has_bias:
        return in_proj, down_proj, None, None
    in_bias = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
    return in_proj, down_proj, in_bias, module.down_proj_bias


def _general_rows(module: nn.Module, rows: Tensor, group_sizes: list[int]) -> Tensor:
    """The module's own expert function on grouped rows [N, H], one busy expert at a time (plain autograd)."""
    in_proj, down_proj, in_bias, out_bias = _weights(module)
    outs, start = [], 0
    for expert, size in enumerate(group_sizes):
        if size:
            x = rows[start:start + size]
            h = F.linear(x, in_proj[expert], None if in_bias is None else in_bias[expert])
            h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
            y = F.linear(h, down_proj[expert], None if out_bias is None else out_bias[expert])
            if module.has_post_expert_norm:
                y = module.post_expert_norm(y)
            outs.append(y)
        start += size
    if outs:
        return torch.cat(outs)
    return rows.new_zeros(0, rows.shape[-1]) + 0.0 * down_proj.sum()  # no rows: keep the weights in the graph


def experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    backend: str = "auto") -> Tensor:
    """`module`'s experts on `hidden_states [T, H]` routed by `top_k_index [T, k]` / `top_k_weights [T, k]`.

    Returns [T, H] in `hidden_states`' dtype: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t).
    Expert ids outside [0, num_experts) (a family's "no expert" slot) contribute nothing. `backend` is a moekit
    expert backend ("auto", "loop", "grouped_mm", "bmm") for the stacked path.
    """
    if module._is_expert_parallel:
        raise NotImplementedError(
            f"experts_implementation='moekit' does not run transformers' expert parallelism ({type(module).__name__} "
            "is sharded); load the model without tp_plan/distributed_config for moekit's experts, or use "
            "experts_implementation='grouped_mm'")
    num_experts = module.num_experts
    num_tokens, k = top_k_index.shape[0], top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    token_of = torch.arange(num_tokens * k, device=hidden_states.device) // k
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    if not bool(valid.all()):
        expert_ids, weights, token_of = expert_ids[valid], weights[valid], token_of[valid]
    plan = plan_dispatch(expert_ids, num_experts)
    row_index = token_of[plan.order]
    scale = weights[plan.order].to(hidden_states.dtype)
    gated = stacked_kind(module)
    if gated is not None:
        in_proj, down_proj, _, _ = _weights(module)
        grouped = stacked_experts(hidden_states, plan.group_sizes, in_proj, down_proj, gated, backend, scale,
                                  row_index)
    else:
        rows = hidden_states.index_select(0, row_index)
        grouped = _general_rows(module, rows, plan.group_sizes) * scale.unsqueeze(-1)
    out = hidden_states.new_zeros(num_tokens, hidden_states.shape[-1], dtype=grouped.dtype)
    return out.index_add_(0, row_index, grouped).to(hidden_states.dtype)


def _entry(backend: str):
    def forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, backend=backend)

    forward.__name__ = f"moekit_{backend}_experts_forward"
    forward.__doc__ = f"`experts_forward` with moekit's {backend!r} expert backend."
    return forward


def register() -> list[str]:
    """Register moekit's experts implementations in transformers' `ExpertsInterface`; returns their names.

    Idempotent. After it, `from_pretrained(..., experts_implementation="moekit")` (or "moekit_loop",
    "moekit_grouped_mm", "moekit_bmm") runs the model's experts with moekit's backends, and
    `model.set_experts_implementation("moekit")` switches a loaded model.
    """
    from transformers.integrations.moe import ExpertsInterface

    for name, backend in IMPLEMENTATIONS.items():
        ExpertsInterface.register(name, _entry(backend))
    return list(IMPLEMENTATIONS)
