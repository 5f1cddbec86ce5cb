"""The validation record: mean loss over a fixed set of val batches, perplexity and the experts' load on them."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from .data import TokenDataset, iter_eval_batches

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates `model` on the first `train.eval_batches` val batches of `dataset` (the same ones every time).

    `autocast` gives the context the forwards run in (the trainer's mixed precision).
    """

    def __init__(self, model: torch.nn.Module, dataset: TokenDataset, batch_size: int, block_size: int,
                 num_batches: int, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model, self.dataset, self.device, self.autocast = model, dataset, device, autocast
        self.batch_size, self.block_size, self.num_batches = batch_size, block_size, num_batches

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean val loss over the batches, perplexity and (MoE models) MaxVio and per-layer expert load on val."""
        self.model.eval()
        losses, loads = [], {}
        for inputs, targets in iter_eval_batches(self.dataset.val, self.batch_size, self.block_size,
                                                 self.num_batches, self.dataset.label_shift):
            with self.autocast():
                out = self.model(inputs.to(self.device), targets=targets.to(self.device))
            losses.append(float(out.loss))
            for i, s in out.moe_stats.items():
                loads[i] = loads.get(i, 0) + s["tokens_per_expert"].float().cpu()
        self.model.train()
        val_loss = sum(losses) / len(losses)
        record: dict[str, Any] = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if loads:
            vios = [float((v.max() - v.mean()) / v.mean()) if v.mean() > 0 else 0.0 for v in loads.values()]
            record["val_max_violation"] = sum(vios) / len(vios)
            record["val_load"] = {str(i): v.tolist() for i, v in loads.items()}
        return record
