"""Stop at the next step boundary with a checkpoint when the job is told to go.

Slurm (requeue, preemption, `scancel`), Kubernetes (pod deletion) and torchrun (a
restart) send SIGTERM and kill the processes some seconds later (Slurm's KillWait,
the pod's grace period). The first SIGTERM or Ctrl-C only sets a flag; with the stats of the
step in flight (trainer/step.py) every rank learns whether any rank got one, and together they
save and exit.
A second signal acts at once (the default handlers are back).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python takes signals only in the main thread; leave them be
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum
        self.uninstall()

    @property
    def name(self) -> str:
        """The signal of this rank, or SIGTERM for a rank that only heard of another's."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        """128 + the signal: what the signal's default action would have left."""
        return 128 + int(self.signum or signal.SIGTERM)
