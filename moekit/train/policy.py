"""When the trainer logs, evaluates, writes a checkpoint and writes a weights-only snapshot."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["CheckpointPolicy"]


class CheckpointPolicy:
    """The intervals of `train` (log, eval, checkpoint, snapshot) for a session that trains up to step `last`.

    Step 1 is always logged, the run's last planned step (`max_steps`) always evaluated and snapshotted (when
    snapshots are on), and `last` (`max_steps`, or `--stop-at`) always saved. Snapshots depend on the step alone,
    never on where a session stops, so a run stopped and resumed writes the snapshots of one uninterrupted run.
    """

    def __init__(self, train: TrainConfig, last: int) -> None:
        self.train, self.last = train, last

    def log_now(self, step: int, skipped: bool) -> bool:
        """A train record for `step` (none for a skipped step: its skip record says why)."""
        return (step % self.train.log_interval == 0 or step == 1) and not skipped

    def evaluate_now(self, step: int) -> bool:
        """An evaluation after `step`."""
        return step % self.train.eval_interval == 0 or step == self.train.max_steps

    def save_now(self, step: int) -> bool:
        """A checkpoint of `step`."""
        return step % self.train.checkpoint_interval == 0 or step == self.last

    def snapshot_now(self, step: int) -> bool:
        """A weights-only snapshot of `step` (`train.snapshot_interval`; 0 = never)."""
        interval = self.train.snapshot_interval
        return interval > 0 and (step % interval == 0 or step == self.train.max_steps)
