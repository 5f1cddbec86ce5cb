"""Ctrl-C and SIGTERM during training, taken only between whole steps.

While :class:`StopSignals` is active, SIGINT and SIGTERM (what Ctrl-C, schedulers and `docker stop` send) only
record that a stop was asked for; the trainer looks at :attr:`StopSignals.requested` after each whole step
(forward, backward, optimiser, scheduler, balancing update, step count) and then saves a checkpoint of exactly
that step and returns. A signal can therefore never split a step between a checkpoint's label and its contents.

In a single process, a second signal stops at once (KeyboardInterrupt), without a checkpoint: the last one
written stands. Under torchrun the agent forwards each signal it gets to every rank (a terminal's Ctrl-C reaches
a rank twice), so there repeated signals are only recorded; the agent's own shutdown timeout is the hard stop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Defer SIGINT/SIGTERM to the next step boundary while the `with` block runs."""

    def __init__(self, force_on_repeat: bool = True) -> None:
        self.force_on_repeat = force_on_repeat
        self.requested: str | None = None
        """The name of the first signal received ("SIGINT", "SIGTERM"), or None."""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and self.force_on_repeat:
            raise KeyboardInterrupt(f"{name} again: stopping now, without a checkpoint of this step")
        if self.requested is None:
            self.requested = name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
