"""The errors that stop a training run on purpose; each message says what happened, what was kept and what to do.

`moekit train` prints them as one line and exits with a non-zero code.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped because continuing would be wrong; the last good checkpoint is kept."""


class RunInUse(TrainingError):
    """Another process trains in this run directory (its lock is held)."""


class NonFiniteTraining(TrainingError):
    """The loss, the gradient norm or the weights stopped being finite numbers."""


class PeerLost(TrainingError):
    """Under torchrun, another rank stopped answering (hung, stopped or died) within the collective timeout."""
