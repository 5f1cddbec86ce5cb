"""Recording what moekit's own routers chose, by forward hooks on each `MoELayer`'s router.

`RoutingRecorder(model)` is a context manager; inside it every forward of `model` appends, per MoE layer, the
experts each real token chose and their weights as `[N, k]` tensors on the CPU (the layer removes padding before it
routes, so padded tokens never appear). `take()` hands the records over and forgets them, so a long analysis
streams batch by batch with bounded memory. Transformers' own models are recorded by `moekit.hf.RoutingCapture`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..layer import MoELayer

__all__ = ["RecordedRouting", "RoutingRecorder", "moe_layers"]

#: routers whose tokens get any number of experts (no [N, k] table): the per-token metrics do not apply
_NOT_TOKEN_CHOICE = ("expert_choice", "soft")


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """The MoE layers of a `MoETransformer`, by decoder-layer index (dense layers left out)."""
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected a moekit MoETransformer, got {type(model).__name__}")
    return {i: block.mlp for i, block in enumerate(blocks) if isinstance(getattr(block, "mlp", None), MoELayer)}


@dataclass(frozen=True)
class RecordedRouting:
    """One forward of one MoE layer: what each of its N real tokens chose."""

    layer: int  # the decoder layer's index in a MoETransformer (else the MoE layer's position in module order)
    expert_index: Tensor  # [N, k] long, first choice first
    weights: Tensor  # [N, k] float32 combine weights


class RoutingRecorder:
    """Records every MoE layer's routing of a moekit model while the context is open."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(getattr(model, "layers", None), nn.ModuleList):  # MoETransformer: index by decoder layer
            self.layers = list(moe_layers(model).items())
        else:  # a bare MoELayer or another container: MoE layers in module order
            self.layers = list(enumerate(m for m in model.modules() if isinstance(m, MoELayer)))
        if not self.layers:
            raise ValueError("RoutingRecorder: the model has no MoELayer; a dense model has no routing to record")
        for _, layer in self.layers:
            if layer.config.router in _NOT_TOKEN_CHOICE:
                raise ValueError(f"RoutingRecorder: router={layer.config.router!r} gives tokens any number of experts "
                                 "(or soft mixtures), so there is no per-token choice of k experts to record; analyse "
                                 "a token-choice model (topk, switch, noisy_topk, deepseek_v3, hierarchical)")
        self._records: list[RecordedRouting] = []
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for index, layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def record(_module: nn.Module, _inputs, routing) -> None:
            k = routing.num_experts_per_tok
            self._records.append(RecordedRouting(index, routing.expert_index.detach().view(-1, k).cpu(),
                                                 routing.weights.detach().float().view(-1, k).cpu()))
        return record

    def take(self) -> list[RecordedRouting]:
        """The records since the last `take`, in forward order (layer by layer within a forward); then forgotten."""
        records, self._records = self._records, []
        return records
