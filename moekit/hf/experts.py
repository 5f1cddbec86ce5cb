"""moekit's expert backends as transformers experts implementations (`experts_implementation="moekit"`).

transformers 5 computes the experts of most MoE families through one registry: an experts module decorated with
`use_experts_implementation` looks `config._experts_implementation` up in `ExpertsInterface` and calls the entry
as `fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. The decorator sets
the layout flags on the module (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`,
`has_post_expert_norm`) and gives it `_apply_gate` (the family's gated activation) and `act_fn`.

:func:`experts_forward` groups the assignments by expert with moekit's dispatch and runs them one of two ways:

- **stacked** (`moekit.layer.experts.stacked_experts`, with the hand-written backwards): experts without biases
  or a post-expert norm whose activation is exactly SwiGLU on concatenated `[gate; up]` rows (the decorator's
  default `_apply_gate` with SiLU) or exactly GELU (no gate). Transposed weights are passed as views. CPU
  training with large groups runs `_CombinedLoopFFN` instead: moekit's loop backend with each expert gathering
  its own rows and scatter-adding its own output (no [N, H] tensor of grouped rows in either direction).
- **general**: anything else (biases, a family's own `_apply_gate` such as GPT-OSS's interleaved clamped
  SwiGLU, other activations, `post_expert_norm`) runs the module's own gate or activation, so it computes what
  the family defines. On the CPU, when torch's `grouped_mm` takes the widths and the module has no parameters
  besides its projections and their biases, the rows run through `_GroupedGeneralFFN`: each projection one
  `grouped_mm` call, biases added per expert, and a hand-written backward that saves only the input and the
  first projection (the activation's own backward is recomputed from it). Otherwise (post-expert norms, other
  devices, autocast) each busy expert's rows run under plain autograd.

Both combine with one scatter-add into token order. With backend "auto" on the CPU, inference on at most
`FEW_ASSIGNMENTS` assignments (a decoding step) skips the grouping: `_few_assignments` runs each assignment's
projections as one matmul each and the module's own gate once over all of them. Expert-parallel modules
(`_is_expert_parallel`, sentinel expert ids) are refused: moekit's expert parallelism is its own
(`moekit.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..layer.dispatch import plan_dispatch
from ..layer.experts import auto_threshold, builds_graph, compute_dtype, stacked_experts
from ..layer.grouped_ffn import activate, expert_slices, grouped_mm_fits, weight_grad_buffer

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


#: the parameters an experts module may own for `_GroupedGeneralFFN` (anything else, e.g. a post-expert norm or an
#: activation with weights, needs autograd through the module's own code)
_PROJECTION_PARAMETERS = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}
#: inference runs `_GroupedGeneralFFN` when the busy experts average more rows than this (fewer: the loop)
GENERAL_GROUPED_MIN_AVERAGE_ROWS = 4


def _general_grouped_fits(module: nn.Module, x: Tensor, in_proj: Tensor, down_proj: Tensor, group_sizes: list[int],
                          rows: int) -> bool:
    """True when `_GroupedGeneralFFN` computes `module`'s experts on these rows (see the module docstring)."""
    if module.has_post_expert_norm or x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or rows == 0:
        return False
    if x.dtype != in_proj.dtype or x.dtype != down_proj.dtype:
        return False
    if any(name not in _PROJECTION_PARAMETERS for name, _ in module.named_parameters()):
        return False
    hidden_size, intermediate_size = down_proj.shape[1:]
    if in_proj.shape[1] % 16 or not grouped_mm_fits(hidden_size, intermediate_size, x.dtype):
        return False
    if builds_graph(x, in_proj):
        return True
    busy = sum(1 for size in group_sizes if size > 0)
    return rows > GENERAL_GROUPED_MIN_AVERAGE_ROWS * busy


def _grouped_product(a: Tensor, b: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
    """The per-expert products `a.T @ b` ([E, ...] with `weight`'s shape) laid out as `weight` is in memory.

    `weight` is [E, P, Q] and `a` [N, P], `b` [N, Q]. When `weight` is a transposed view of a row-major [E, Q, P]
    tensor, the product is computed as [E, Q, P] and returned transposed, so the gradient has the parameter's
    own layout and autograd does not copy it.
    """
    if weight.stride(-1) != 1 and weight.transpose(-2, -1).is_contiguous():
        return F.grouped_mm(b.t(), a, offs=offsets).transpose(-2, -1)
    return F.grouped_mm(a.t(), b, offs=offsets)


class _GroupedGeneralFFN(torch.autograd.Function):
    # Experts with biases and/or a family's own gate or activation `act` (an elementwise function of each row of
    # the first projection, e.g. GPT-OSS's interleaved clamped SwiGLU):
    #   h = x[row_index] @ w_in[e].T + b_in[e];  a = act(h) * scale;  out = a @ w_out[e].T + scale * b_out[e]
    # Every projection is one `grouped_mm` call. Backward keeps only x and h: the gather is redone, and `act`'s
    # backward comes from a small autograd graph of `act` alone, rebuilt from h.
    @staticmethod
    def forward(ctx, x: Tensor, row_index: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, scale: Tensor | None, group_sizes: list[int], act: Callable[[Tensor], Tensor]
                ) -> Tensor:
        offsets = torch.tensor(group_sizes, device=x.device).cumsum(0).to(torch.int32)
        xg = x.index_select(0, row_index)
        h = F.grouped_mm(xg, w_in.transpose(-2, -1), offs=offsets)
        slices = list(expert_slices(group_sizes))
        if b_in is not None:
            for e, start, end in slices:
                h[start:end].add_(b_in[e])
        version = h._version
        a = act(h)
        if h._version != version:
            raise RuntimeError("the experts' activation changed its input in place; moekit's experts "
                               "implementation cannot recompute it in backward")
        if scale is not None:  # in place unless `act` returned (a view of) its input
            shares_input = a.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
            a = a * scale.unsqueeze(-1) if shares_input else a.mul_(scale.unsqueeze(-1))
        out = F.grouped_mm(a.to(w_out.dtype), w_out.transpose(-2, -1), offs=offsets)
        if b_out is not None:
            for e, start, end in slices:
                if scale is None:
                    out[start:end].add_(b_out[e])
                else:
                    out[start:end].addcmul_(scale[start:end].unsqueeze(-1), b_out[e])
        ctx.save_for_backward(x, row_index, w_in, w_out, b_in, b_out, scale, offsets, h)
        ctx.slices, ctx.act = slices, act
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, row_index, w_in, w_out, b_in, b_out, scale, offsets, h = ctx.saved_tensors
        need_x, _, need_w_in, need_w_out, need_b_in, need_b_out, need_scale = ctx.needs_input_grad[:7]
        slices = ctx.slices
        grad_out = grad_out.contiguous()  # grouped_mm rejects the stride-0 gradient of a plain .sum()
        with torch.enable_grad():
            h_leaf = h.detach().requires_grad_(True)
            a0 = ctx.act(h_leaf)  # the unscaled activation and its graph, recomputed
        se = scale.unsqueeze(-1) if scale is not None else None
        grad_a = F.grouped_mm(grad_out, w_out, offs=offsets)  # [N, I]
        grad_w_out = grad_b_out = grad_scale = None
        if need_w_out:
            scaled = a0.detach() * se if se is not None else a0.detach()
            grad_w_out = _grouped_product(grad_out, scaled, offsets, w_out)
        if need_b_out:
            grad_b_out = torch.zeros_like(b_out)
            for e, start, end in slices:  # the rows' (scaled) output gradients, summed per expert
                if scale is None:
                    torch.sum(grad_out[start:end], 0, out=grad_b_out[e])
                else:
                    torch.mv(grad_out[start:end].t(), scale[start:end], out=grad_b_out[e])
        if se is not None:
            if need_scale:
                grad_scale = (grad_a * a0.detach()).sum(-1)
                if b_out is not None:
                    for e, start, end in slices:
                        grad_scale[start:end].addmv_(grad_out[start:end], b_out[e])
            grad_a.mul_(se)
        (grad_h,) = torch.autograd.grad(a0, h_leaf, grad_a)
        del a0, h_leaf
        grad_b_in = None
        if need_b_in:
            grad_b_in = torch.zeros_like(b_in)
            for e, start, end in slices:
                torch.sum(grad_h[start:end], 0, out=grad_b_in[e])
        grad_w_in = None
        if need_w_in:
            grad_w_in = _grouped_product(grad_h, x.index_select(0, row_index), offsets, w_in)
        grad_x = None
        if need_x:
            grad_x = torch.zeros_like(x).index_add_(0, row_index, F.grouped_mm(grad_h, w_in, offs=offsets))
        return grad_x, None, grad_w_in, grad_w_out, grad_b_in, grad_b_out, grad_scale, None, None


#: inference on at most this many (token, expert) assignments (decoding) runs `_few_assignments`
FEW_ASSIGNMENTS = 16
#: CPU training of stacked experts runs `_CombinedLoopFFN` when the average busy expert's rows x hidden size exceeds
#: this (below it torch's `grouped_mm`, as `stacked_experts` chooses, wins on the per-expert Python cost)
COMBINED_LOOP_MIN_ROW_ELEMENTS = 32768


def _needs_graph(module: nn.Module, hidden_states: Tensor, top_k_weights: Tensor) -> bool:
    """True when this call must build an autograd graph (to the input, the routing weights or a parameter)."""
    if not torch.is_grad_enabled():
        return False
    return (hidden_states.requires_grad or top_k_weights.requires_grad
            or any(p.requires_grad for p in module.parameters()))


def _few_assignments(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Inference on a handful of assignments (a decoding step), with no dispatch tensors.

    Each assignment's two projections are one matmul each, written into the rows of one [S, 2I] and one [S, H]
    buffer, and the module's own gate (or activation, and post-expert norm) runs once over all S rows. At decode
    sizes the weights' reads are the cost; grouping by expert would add a dozen small tensors (and `grouped_mm`
    a walk over every expert) for nothing, since an expert rarely gets two of a handful of assignments.
    """
    num_experts, k = module.num_experts, top_k_index.shape[-1]
    in_proj, down_proj, in_bias, out_bias = _weights(module)
    experts = top_k_index.reshape(-1).tolist()
    kept = [j for j, expert in enumerate(experts) if 0 <= expert < num_experts]
    h = hidden_states.new_empty(len(kept), in_proj.shape[1])
    for row, j in enumerate(kept):
        x, weight = hidden_states[j // k: j // k + 1], in_proj[experts[j]].t()
        if in_bias is None:
            torch.mm(x, weight, out=h[row: row + 1])
        else:
            torch.addmm(in_bias[experts[j]], x, weight, out=h[row: row + 1])
    a = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = hidden_states.new_empty(len(kept), down_proj.shape[1])
    for row, j in enumerate(kept):
        weight = down_proj[experts[j]].t()
        if out_bias is None:
            torch.mm(a[row: row + 1], weight, out=y[row: row + 1])
        else:
            torch.addmm(out_bias[experts[j]], a[row: row + 1], weight, out=y[row: row + 1])
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    weights = top_k_weights.reshape(-1)
    if len(kept) == len(experts):  # every slot is an expert: sum each token's k rows
        weighted = y * weights.unsqueeze(-1).to(y.dtype)
        return weighted.view(-1, k, y.shape[-1]).sum(1).to(hidden_states.dtype)
    weighted = y * weights[kept].unsqueeze(-1).to(y.dtype)
    tokens = torch.tensor([j // k for j in kept], dtype=torch.long, device=hidden_states.device)
    return hidden_states.new_zeros(hidden_states.shape).index_add_(0, tokens, weighted.to(hidden_states.dtype))


def _combined_loop_fits(x: Tensor, in_proj: Tensor, down_proj: Tensor, group_sizes: list[int], rows: int) -> bool:
    """True when `_CombinedLoopFFN` runs these stacked experts (CPU training, large groups; see the constant)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or rows == 0:
        return False
    if x.dtype != in_proj.dtype or x.dtype != down_proj.dtype or not builds_graph(x, in_proj):
        return False
    busy = sum(1 for size in group_sizes if size > 0)
    return rows * x.shape[1] > COMBINED_LOOP_MIN_ROW_ELEMENTS * busy


def _inference_grouped_mm(x: Tensor, in_proj: Tensor, down_proj: Tensor, group_sizes: list[int], rows: int) -> bool:
    """True for CPU inference with up to `grouped_mm_cpu_rows`' upper bound (`AUTO_BACKEND_THRESHOLDS`) rows per
    busy expert on average (a prefill).

    Routing in a real model is uneven: the padded `bmm`, which `stacked_experts` may choose at these sizes, pads
    every expert to the busiest one, and torch's `grouped_mm` (the kernel of transformers' own `grouped_mm`,
    without its sort and gathers) does no padded work. Larger groups keep `stacked_experts`' choice (the loop).
    """
    if x.device.type != "cpu" or rows == 0 or builds_graph(x, in_proj):
        return False
    if not grouped_mm_fits(down_proj.shape[1], down_proj.shape[2], compute_dtype(x)):
        return False
    busy = sum(1 for size in group_sizes if size > 0)
    return rows <= auto_threshold("grouped_mm_cpu_rows")[1] * busy


class _CombinedLoopFFN(torch.autograd.Function):
    # SwiGLU (`gated`) or GELU stacked experts on the rows x[row_index], expert-major, combined into token order:
    #   out[t] = sum over the rows n of token t of  scale[n] * (act(x_t @ w_in[e_n].T) @ w_out[e_n].T)
    # One expert at a time, as moekit's loop backend, but each expert gathers its own rows and scatter-adds its
    # output into the token rows itself (and backward gathers its rows of the output's gradient), so no [N, H]
    # tensor of grouped rows exists in either direction: those are fresh pages on every call, which cost more
    # than the copies once each expert's slice stays in cache. Saved for backward: x and each expert's [n_e, 2I]
    # (or [n_e, I]) projection, as in moekit's loop backend.
    @staticmethod
    def forward(ctx, x: Tensor, row_index: Tensor, w_in: Tensor, w_out: Tensor, scale: Tensor,
                group_sizes: list[int], gated: bool) -> Tensor:
        out = torch.zeros_like(x)
        slices = list(expert_slices(group_sizes))
        projections = []
        for e, start, end in slices:
            rows = row_index[start:end]
            he = torch.mm(x.index_select(0, rows), w_in[e].t())
            projections.append(he)
            a = activate(he, gated)
            a.mul_(scale[start:end].unsqueeze(-1))
            out.index_add_(0, rows, torch.mm(a, w_out[e].t()))
        ctx.save_for_backward(x, row_index, w_in, w_out, scale, *projections)
        ctx.slices, ctx.group_sizes, ctx.gated = slices, group_sizes, gated
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, row_index, w_in, w_out, scale, *projections = ctx.saved_tensors
        need_x, _, need_w_in, need_w_out, need_scale = ctx.needs_input_grad[:5]
        gated, inner = ctx.gated, w_out.shape[2]
        grad_out = grad_out.contiguous()
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w_in = weight_grad_buffer(w_in, ctx.group_sizes, torch.preserve_format) if need_w_in else None
        grad_w_out = weight_grad_buffer(w_out, ctx.group_sizes, torch.preserve_format) if need_w_out else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        for (e, start, end), he in zip(ctx.slices, projections, strict=True):
            rows = row_index[start:end]
            go = grad_out.index_select(0, rows)
            se = scale[start:end].unsqueeze(-1)
            if gated:
                gate, up = he.chunk(2, dim=-1)
                silu_gate = F.silu(gate)
                a0 = silu_gate * up  # the unscaled activation, recomputed
            else:
                a0 = F.gelu(he)
            grad_a = torch.mm(go, w_out[e])  # [n, I]
            if need_w_out:
                torch.mm(go.t(), a0 * se, out=grad_w_out[e])
            if need_scale:
                torch.sum(grad_a * a0, -1, out=grad_scale[start:end])
            del a0
            grad_a.mul_(se)
            if gated:  # d(silu(g) * u) = u * silu'(g) dg + silu(g) du
                grad_h = he.new_empty(he.shape)
                torch.ops.aten.silu_backward.grad_input(grad_a * up, gate, grad_input=grad_h[:, :inner])
                torch.mul(grad_a, silu_gate, out=grad_h[:, inner:])
            else:
                grad_h = torch.ops.aten.gelu_backward(grad_a, he)
            if need_w_in:
                torch.mm(grad_h.t(), x.index_select(0, rows), out=grad_w_in[e])
            if need_x:
                grad_x.index_add_(0, rows, torch.mm(grad_h, w_in[e]))
        return grad_x, None, grad_w_in, grad_w_out, grad_scale, None, None


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
    if (backend == "auto" and hidden_states.device.type == "cpu" and top_k_index.numel() <= FEW_ASSIGNMENTS
            and not _needs_graph(module, hidden_states, top_k_weights)):
        return _few_assignments(module, hidden_states, top_k_index, top_k_weights)
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
        if backend == "auto" and _combined_loop_fits(hidden_states, in_proj, down_proj, plan.group_sizes,
                                                     row_index.numel()):
            return _CombinedLoopFFN.apply(hidden_states, row_index, in_proj, down_proj, scale, plan.group_sizes, gated)
        if backend == "auto" and _inference_grouped_mm(hidden_states, in_proj, down_proj, plan.group_sizes,
                                                       row_index.numel()):
            backend = "grouped_mm"
        grouped = stacked_experts(hidden_states, plan.group_sizes, in_proj, down_proj, gated, backend, scale,
                                  row_index)
    else:
        in_proj, down_proj, in_bias, out_bias = _weights(module)
        if _general_grouped_fits(module, hidden_states, in_proj, down_proj, plan.group_sizes, row_index.numel()):
            act = module._apply_gate if module.has_gate else module.act_fn
            grouped = _GroupedGeneralFFN.apply(hidden_states, row_index, in_proj, down_proj, in_bias, out_bias, scale,
                                               plan.group_sizes, act)
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
