"""What a run tells: `metrics.jsonl`, TensorBoard, the progress bar and `moekit train:` lines on stderr.

:class:`MetricsLogger` is the trainer's only writer of these; under torchrun only rank 0 writes, but every rank
calls it at the same steps (a logged step's numbers are reduced over all ranks first). :class:`StepRecord` is what
one optimiser step reports to it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._files import append_line, read_json_lines, write_json_lines
from .parallel import LocalParallel, TrainParallel

__all__ = ["MetricsLogger", "StepRecord", "moe_summary"]


@dataclass
class StepRecord:
    """One optimiser step, as `Trainer.train_step` reports it (this rank's numbers)."""

    step: int
    tokens: int
    loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    exchanged_bytes: float = 0.0  # sent through the expert-parallel all-to-all, over the step's micro-batches
    moe_stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # of the last micro-batch
    skipped: bool = False  # a non-finite value: no update was made
    stop: bool = False  # every rank agreed to stop after this step (a signal)


def moe_summary(stats: dict[int, dict[str, torch.Tensor]], with_load: bool = True) -> dict[str, Any]:
    """Mean MaxVio and dropped fraction over MoE layers (and each layer's load, for the log)."""
    if not stats:
        return {}
    summary: dict[str, Any] = {
        "max_violation": float(sum(s["max_violation"] for s in stats.values()) / len(stats)),
        "dropped_fraction": float(sum(s["dropped_fraction"] for s in stats.values()) / len(stats)),
    }
    if with_load:
        summary["load"] = {str(i): s["tokens_per_expert"].tolist() for i, s in stats.items()}
    return summary


class MetricsLogger:
    """The run's log records, TensorBoard scalars, progress bar and messages; only rank 0 writes.

    `tensorboard=False` (a run opened read-only) opens no TensorBoard writer; `progress=False` shows no bar.
    """

    def __init__(self, run_dir: Path, parallel: LocalParallel | TrainParallel, *, progress: bool = True,
                 tensorboard: bool = True, init_from: str | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.parallel = parallel
        self.writes = parallel.is_main
        self.show_progress = progress and self.writes
        self.init_from = init_from
        self.bar = None
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard") if self.writes and tensorboard \
            else None

    # ------------------------------------------------------------------ records and messages
    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (and its numbers to TensorBoard)."""
        if not self.writes:
            return
        append_line(self.path, json.dumps(record), what="training log")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def say(self, message: str) -> None:
        """One `moekit train:` line on stderr."""
        if self.writes:
            print(f"moekit train: {message}", file=sys.stderr, flush=True)

    def trim_after(self, step: int) -> None:
        """Drop log records of steps after `step` (a resumed run trains them again), so no step appears twice."""
        if not self.writes or not self.path.is_file():
            return
        records = read_json_lines(self.path)
        kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
        if len(kept) != len(records) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
            write_json_lines(self.path, kept)

    def log_step(self, record: StepRecord, logged: bool) -> dict[str, str]:
        """The train record of a step the policy logs (`logged`; numbers over all ranks); returns the progress
        bar's figures for :meth:`advance`."""
        loss, aux, stats, parallel = record.loss, record.aux_loss, record.moe_stats, {}
        if logged:
            loss, aux, stats, parallel = self.parallel.reduce_for_log(loss, aux, record.exchanged_bytes, stats)
        summary = moe_summary(stats, with_load=logged) if logged or self.bar is not None else {}
        if logged:
            origin = {"init_from": self.init_from} if record.step == 1 and self.init_from is not None else {}
            self.log({"kind": "train", "step": record.step, "tokens": record.tokens, "loss": loss, "aux_loss": aux,
                      "lr": record.lr, "grad_norm": record.grad_norm, "tokens_per_s": record.tokens_per_s,
                      "elapsed_s": record.elapsed_s, **summary, **origin, **parallel})
        return {"loss": f"{loss:.3f}", "tok_s": f"{record.tokens_per_s:,.0f}",
                "maxvio": f"{summary.get('max_violation', 0.0):.2f}"}

    def log_eval(self, step: int, tokens: int, record: dict[str, Any]) -> float:
        """The eval record of `step`; returns its val loss."""
        self.log({"kind": "eval", "step": step, "tokens": tokens, **record})
        return record["val_loss"]

    def log_skip(self, step: int, reason: str) -> None:
        self.log({"kind": "skip", "step": step, "reason": reason})

    # ------------------------------------------------------------------ the progress bar
    def open_progress(self, total: int, initial: int) -> None:
        """Show a bar of `total` steps from `initial` (rank 0, with progress on and tqdm installed)."""
        self.bar = _progress(self.show_progress, total, initial)

    def advance(self, figures: dict[str, str]) -> None:
        """Move the bar one step, showing `figures` (from :meth:`log_step`)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**figures)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _tensorboard_writer(path: Path):
    """A TensorBoard SummaryWriter when the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
