"""Router saturation across a run's history (OLMoE, Muennighoff et al. 2024, section on routing saturation).

For the same tokens routed by the weights of an earlier step t and by the run's final weights, saturation(t) is the
share of each token's final top-k experts that step t already chose, averaged over tokens:

    saturation_l(t) = 1 / (N k) * sum over tokens i of |topk_l,t(i) ∩ topk_l,final(i)|

per MoE layer l (N tokens, k experts per token), and overall the mean over the MoE layers. It is 1 at the final
step by definition, and about k / E for an untrained router (chance). The earlier weights are the run's snapshots
(`train.snapshot_interval`, `moekit.train.snapshots`); the final weights are its newest complete checkpoint, or its
newest snapshot when that is of a later step (a run stopped between the two writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..train.checkpoint import find_checkpoint, load_weights, read_meta
from ..train.load import load_run
from ..train.snapshots import find_snapshots
from .record import RoutingRecorder

__all__ = ["router_saturation", "topk_overlap"]


def topk_overlap(chosen: Tensor, final: Tensor) -> Tensor:
    """Per token, how many of its `final` experts `chosen` also holds: [N, k] x [N, k] -> [N] long.

    Each row's experts are distinct (a top-k), so the count is the size of the intersection of the two sets.
    """
    if chosen.shape != final.shape or chosen.dim() != 2:
        raise ValueError(f"topk_overlap needs two [N, k] tables of one shape, got {tuple(chosen.shape)} and "
                         f"{tuple(final.shape)}")
    return (final.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).sum(-1)


def _check_batches(batches: list[Tensor], vocab_size: int) -> None:
    if not batches:
        raise ValueError("router_saturation needs at least one batch of token ids to route")
    for number, ids in enumerate(batches):
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32) \
                or ids.numel() == 0:
            raise ValueError(f"router_saturation: batch {number} must be a non-empty [B, T] tensor of integer token "
                             f"ids, got {type(ids).__name__} {tuple(getattr(ids, 'shape', ()))} "
                             f"{getattr(ids, 'dtype', '')}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"router_saturation: batch {number} holds token id {low if low < 0 else high}, outside "
                             f"the model's vocabulary [0, {vocab_size}); encode the text with the run's tokenizer")


@torch.no_grad()
def _route(model: torch.nn.Module, batches: list[Tensor], device: torch.device) -> dict[int, list[Tensor]]:
    """Per MoE layer, the chosen experts of every batch ([N_b, k] each, in batch order)."""
    routed: dict[int, list[Tensor]] = {}
    with RoutingRecorder(model) as recorder:
        for ids in batches:
            model(ids.to(device=device, dtype=torch.long))
            for record in recorder.take():
                routed.setdefault(record.layer, []).append(record.expert_index)
    return routed


def router_saturation(run_dir: str | Path, batches: list[Tensor], *,
                      device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Router saturation of the run in `run_dir` over the tokens of `batches` (each `[B, T]` token ids).

    Returns the `"saturation"` entry of analysis.json: ``{"steps": [...], "final_step": F, "layers": {"<layer>":
    [...]}, "overall": [...]}`` with one value per step (every snapshot step before F, then F itself, whose value
    is 1.0), or None when the run has no snapshots. Layers are decoder-layer numbers. Runs whose routers give tokens
    no fixed k experts (expert choice, soft MoE) are refused by `RoutingRecorder`, and runs of transformers' own
    class (`train.backend=transformers`) here.
    """
    run_dir = Path(run_dir)
    snapshots = find_snapshots(run_dir)
    if not snapshots:
        return None
    try:
        final_path = find_checkpoint(run_dir, need="weights")
        final_step = read_meta(final_path)["step"]
    except FileNotFoundError:
        final_path, final_step = snapshots[-1].path, snapshots[-1].step
    if snapshots[-1].step > final_step:
        final_path, final_step = snapshots[-1].path, snapshots[-1].step
    run, model, _ = load_run(run_dir, final_path, what="measure router saturation")
    if run.uses_transformers:
        raise ValueError(f"router saturation of {run_dir}: this run trains transformers' own class "
                         "(train.backend=transformers); it reads moekit's own routers (train.backend=moekit)")
    _check_batches(batches, run.model.vocab_size)
    device = torch.device(device)
    model.to(device)
    final = {layer: torch.cat(parts) for layer, parts in _route(model, batches, device).items()}
    layers = sorted(final)
    steps = [s for s in snapshots if s.step < final_step]
    values: dict[int, list[float]] = {layer: [] for layer in layers}
    for snapshot in steps:
        load_weights(snapshot.path, model)  # into the tensors already on `device`
        routed = _route(model, batches, device)
        for layer in layers:
            chosen = torch.cat(routed[layer])
            values[layer].append(float(topk_overlap(chosen, final[layer]).sum()) / chosen.numel())
    for layer in layers:
        values[layer].append(1.0)
    overall = [sum(values[layer][i] for layer in layers) / len(layers) for i in range(len(steps) + 1)]
    return {"steps": [s.step for s in steps] + [final_step], "final_step": final_step,
            "layers": {str(layer): values[layer] for layer in layers}, "overall": overall}
