"""Routing capture for any transformers MoE model: which experts each token chose, with what weights.

Family-agnostic by construction: the chosen experts and weights are read where every family hands them over,
at the call of its experts module (`forward(hidden_states, top_k_index, top_k_weights)`: transformers'
`use_experts_implementation` contract, which DBRX's experts follow undecorated), and the router logits from the
module the model itself declares for them (`model._can_record_outputs["router_logits"]`, the table
`output_router_logits=True` reads), so no family's router is re-implemented here.
Padding is removed with the attention mask given to the capture.

    with RoutingCapture(model) as routing:
        routing.attention_mask = mask               # [B, T], 1 = real token (optional)
        model(input_ids, attention_mask=mask)
    for layer in routing.layers:                    # MoE layers in model order
        layer.expert_index, layer.weights, layer.router_logits   # [tokens, k], [tokens, k], [tokens, E] or None

Each forward appends one `RoutingRecord` per layer; `clear()` drops them. With `detach=False` the weights and
logits keep their autograd graph (what a balancing loss needs); the default detaches them (analysis).

The one family whose experts take no routing (Llama 4: its experts get inputs already scaled by the router) is
read at its router instead, whose output holds the dense scores (zero off the chosen experts) and the logits:
`SCORE_ROUTERS` names it. A model with neither is refused.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .experts import is_interface_experts

_LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


#: router classes whose forward returns (dense scores [T, E], nonzero exactly at the chosen experts; logits [T, E]):
#: class name -> (index of the scores, index of the logits) in the output tuple
SCORE_ROUTERS: dict[str, tuple[int, int]] = {"Llama4Router": (0, 1)}


def _routing_parameters(module: nn.Module) -> list[str]:
    """The names of `module.forward`'s first three parameters after self ([] when it cannot be read)."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return []
    return parameters[1:4]


def takes_routing(module: nn.Module) -> bool:
    """True for an experts module called as `forward(hidden_states, expert ids [T, k], weights [T, k])`.

    That is every module built by `use_experts_implementation` (the interface passes exactly these three, whatever
    a family names them: GPT-OSS says `router_indices, routing_weights`), and an undecorated one whose forward
    names them `hidden_states, top_k_index, top_k_weights` (DBRX).
    """
    if is_interface_experts(module):
        return True
    return _routing_parameters(module) == ["hidden_states", "top_k_index", "top_k_weights"]


@dataclass
class RoutingRecord:
    """One MoE layer's routing in one forward, padding removed.

    expert_index: [n, k] int64, the chosen experts; weights: [n, k], the weights the experts' outputs are
    combined with; router_logits: [n, E] as the family's router returns them, or None where it exposes none.
    """

    expert_index: Tensor
    weights: Tensor
    router_logits: Tensor | None


@dataclass
class LayerRouting:
    """The routing recorded at one MoE layer (one experts module)."""

    name: str  # the experts module's name in the model (the router's, for a `SCORE_ROUTERS` family)
    layer: int  # the decoder layer's number (from the name; else the order of MoE layers)
    num_experts: int
    router: nn.Module | None  # the module whose output holds the router logits, if the family declares one
    top_k: int | None = None  # set for a `SCORE_ROUTERS` layer, whose routing is read at the router
    records: list[RoutingRecord] = field(default_factory=list)

    def _cat(self, attribute: str) -> Tensor | None:
        values = [getattr(record, attribute) for record in self.records]
        if not values or any(value is None for value in values):
            return None
        return torch.cat(values)

    @property
    def expert_index(self) -> Tensor | None:
        """[tokens, k] over every recorded forward (None before the first)."""
        return self._cat("expert_index")

    @property
    def weights(self) -> Tensor | None:
        """[tokens, k] combine weights over every recorded forward."""
        return self._cat("weights")

    @property
    def router_logits(self) -> Tensor | None:
        """[tokens, E] router logits over every recorded forward; None where the family exposes none."""
        return self._cat("router_logits")

    def load(self) -> Tensor:
        """Assignments per expert [E] (float) over every recorded forward."""
        index = self.expert_index
        if index is None:
            return torch.zeros(self.num_experts)
        index = index.reshape(-1)
        index = index[(index >= 0) & (index < self.num_experts)]
        return torch.bincount(index.cpu(), minlength=self.num_experts).float()


def _router_recorder(model: nn.Module) -> tuple[type, int] | None:
    """(router class, output index) the model declares for its router logits, or None."""
    table = getattr(model, "_can_record_outputs", None) or {}
    recorder = table.get("router_logits")
    if recorder is None:
        for module in model.modules():  # a wrapper (e.g. a CausalLM) may hold the table on its inner model
            table = getattr(module, "_can_record_outputs", None) or {}
            if table.get("router_logits") is not None:
                recorder = table["router_logits"]
                break
    if recorder is None:
        return None
    if isinstance(recorder, type):
        return recorder, 0
    return recorder.target_class, recorder.index


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _layer_number(name: str) -> int | None:
    found = _LAYER_NUMBER.findall(name)
    return int(found[-1]) if found else None


def routing_layers(model: nn.Module) -> list[LayerRouting]:
    """One empty `LayerRouting` per MoE layer of `model`, in model order.

    Raises ValueError when the model has no experts module called with the routing and no `SCORE_ROUTERS` router.
    """
    layers = []
    experts = [(name, module) for name, module in model.named_modules() if takes_routing(module)]
    recorder = _router_recorder(model)
    routers = {}
    if recorder is not None:
        router_class, _ = recorder
        routers = {name: module for name, module in model.named_modules() if isinstance(module, router_class)}
    for position, (name, module) in enumerate(experts):
        number = _layer_number(name)
        layers.append(LayerRouting(name, position if number is None else number, int(module.num_experts),
                                   _match_router(name, routers)))
    if not layers:
        scored = [(name, module) for name, module in model.named_modules() if type(module).__name__ in SCORE_ROUTERS]
        for position, (name, module) in enumerate(scored):
            number = _layer_number(name)
            layers.append(LayerRouting(name, position if number is None else number, int(module.num_experts),
                                       module, top_k=int(module.top_k)))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no experts module called with (hidden_states, top_k_index, "
                         "top_k_weights) and no router moekit can read, so its routing cannot be recorded; "
                         "moekit's native families load with moekit.interop.load_hf instead")
    return layers


def _match_router(experts_name: str, routers: dict[str, nn.Module]) -> nn.Module | None:
    """The router beside an experts module: the one under the nearest common parent."""
    parent = _parent(experts_name)
    while True:
        inside = [module for name, module in routers.items() if _parent(name) == parent or
                  (parent and name.startswith(parent + ".") and _layer_number(name) == _layer_number(experts_name))]
        if len(inside) == 1:
            return inside[0]
        if len(inside) > 1 or not parent:
            return None
        parent = _parent(parent)


class RoutingCapture:
    """Record every MoE layer's routing while it is open (a context manager; hooks are removed on exit).

    Args:
        model: a transformers model whose experts use `use_experts_implementation`.
        attention_mask: optional [B, T] mask (1 = real token) for the next forwards; settable later. Rows of a
            forward whose count is not B*T are refused rather than guessed.
        detach: detach the recorded tensors (default) or keep their graph (for a balancing loss).
        logits: also record the router logits where the family declares them.
    """

    def __init__(self, model: nn.Module, attention_mask: Tensor | None = None, detach: bool = True,
                 logits: bool = True) -> None:
        self.model = model
        self.attention_mask = attention_mask
        self.detach = detach
        self.layers = routing_layers(model)
        self._logits_wanted = logits
        self._handles: list[Any] = []
        self._pending: dict[int, Tensor] = {}  # router module id -> its last logits, until its experts run

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> RoutingCapture:
        modules = dict(self.model.named_modules())
        recorder = _router_recorder(self.model)
        output_index = recorder[1] if recorder is not None else 0
        for layer in self.layers:
            if layer.top_k is not None:
                self._handles.append(layer.router.register_forward_hook(self._score_router_hook(layer)))
                continue
            self._handles.append(modules[layer.name].register_forward_pre_hook(self._experts_hook(layer),
                                                                               with_kwargs=True))
            if self._logits_wanted and layer.router is not None:
                self._handles.append(layer.router.register_forward_hook(self._router_hook(output_index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the records stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def clear(self) -> None:
        """Drop every record (keep the hooks)."""
        for layer in self.layers:
            layer.records.clear()
        self._pending.clear()

    def _router_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            logits = output[index] if isinstance(output, (tuple, list)) else output
            self._pending[id(module)] = logits
        return hook

    def _score_router_hook(self, layer: LayerRouting):
        scores_at, logits_at = SCORE_ROUTERS[type(layer.router).__name__]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            scores, logits = output[scores_at], output[logits_at]
            index = scores.detach().topk(layer.top_k, dim=-1).indices
            self._record(layer, index, scores.gather(-1, index), logits if self._logits_wanted else None)
        return hook

    def _record(self, layer: LayerRouting, index: Tensor, weights: Tensor, logits: Tensor | None) -> None:
        keep = self._kept_rows(index.shape[0], layer)
        if keep is not None:
            index, weights = index[keep], weights[keep]
            logits = logits[keep] if logits is not None else None
        if self.detach:
            weights = weights.detach()
            logits = logits.detach() if logits is not None else None
        layer.records.append(RoutingRecord(index.detach(), weights, logits))

    def _experts_hook(self, layer: LayerRouting):
        names = _routing_parameters(dict(self.model.named_modules())[layer.name])

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            values = list(args[:3]) + [kwargs[name] for name in names[len(args):] if name in kwargs]
            if len(values) < 3 or values[1] is None or values[2] is None:
                raise ValueError(f"{type(module).__name__} ({layer.name}) was called without its expert ids and "
                                 f"weights ({', '.join(names)}); its routing cannot be read")
            index, weights = values[1], values[2]
            logits = self._pending.pop(id(layer.router), None) if layer.router is not None else None
            if logits is not None:
                logits = logits.reshape(-1, logits.shape[-1])
                if logits.shape[0] != index.shape[0]:
                    logits = None  # the family's router output is not one row per routed token: not guessed at
            self._record(layer, index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1]), logits)
        return hook

    def _kept_rows(self, rows: int, layer: LayerRouting) -> Tensor | None:
        mask = self.attention_mask
        if mask is None:
            return None
        if mask.numel() != rows:
            raise ValueError(f"RoutingCapture: {layer.name} routed {rows} tokens but the attention mask has "
                             f"{mask.numel()} entries ({tuple(mask.shape)}); pass the mask of this forward's "
                             "input_ids")
        keep = mask.reshape(-1).bool()
        return None if bool(keep.all()) else keep.to(self._device(layer))

    def _device(self, layer: LayerRouting) -> torch.device:
        module = dict(self.model.named_modules())[layer.name]
        return next(module.parameters()).device
