"""Stop on SIGTERM at a step boundary, with a checkpoint: a cluster's pre-emption notice.

Schedulers (Slurm, Kubernetes, torchrun when another rank failed) send SIGTERM and kill the
process a grace period later. ``StopSignal`` records the first SIGTERM; the run loop folds the
flag into the all-reduce each step already does, so every rank stops after the same step, saves
and exits cleanly. The first signal also restores the default action, so a second SIGTERM ends
the process at once, even while it is blocked inside a collective or a save.

The handler is installed only in the main thread (Python delivers signals there; elsewhere
``signal.signal`` raises) and the previous handler is restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopSignal:
    """``with StopSignal() as stop:`` ... ``stop.requested`` is the name of the signal received, or ``None``."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
