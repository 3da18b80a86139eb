"""Where a step's time goes: data wait, forward, backward, communication, optimizer.

On CUDA each phase is bracketed by two CUDA events on the current stream. Recording an event does
not wait for the device, and the events are read at the next report only once they have completed
(`query()`, never `synchronize()`), so timing adds no synchronisation to the hot path; a step whose
events are still running is reported next time. The times are device time between the brackets: a
device left idle by a slow host shows up in the phase that waited. `data` is host time (waiting for
the loader and the host-to-device copies). On CPU every phase is wall time.

`comm` is the gradient reduction DeepSpeed runs at the end of the step's last backward (all of it at
ZeRO-0, what the overlap left at ZeRO-1/2) plus the step's all-reduce of its stats; `backward` is
the rest of the backward. The ZeRO parameter all-gather after the update is inside `optimizer`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

PHASES = ("data", "forward", "backward", "comm", "optimizer")


@dataclass
class _Step:
    host_ms: dict[str, float] = field(default_factory=dict)
    events: list[tuple[str, Optional[str], object, object]] = field(default_factory=list)
    """(phase, enclosing phase, start, end) CUDA events."""


class StepTimer:
    """Phase times per optimizer step, averaged over the steps finished since the last report."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self._pending: list[_Step] = []
        self._open: list[str] = []
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._steps = 0

    @classmethod
    def off(cls) -> "StepTimer":
        return cls(torch.device("cpu"), enabled=False)

    def start_step(self) -> None:
        if self.enabled:
            self._pending.append(_Step())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled or not self._pending:
            yield
            return
        step, parent = self._pending[-1], (self._open[-1] if self._open else None)
        self._open.append(name)
        host = name == "data" or not self.cuda
        start = time.perf_counter() if host else _event()
        try:
            yield
        finally:
            self._open.pop()
            if host:
                ms = 1000 * (time.perf_counter() - start)
                step.host_ms[name] = step.host_ms.get(name, 0.0) + ms
                if parent:  # a nested phase is not also counted in the one around it
                    step.host_ms[parent] = step.host_ms.get(parent, 0.0) - ms
            else:
                step.events.append((name, parent, start, _event()))

    def watch_gradient_reduction(self, engine) -> None:
        """Time DeepSpeed's end-of-backward gradient reduction as `comm` (inside `backward`)."""
        reduce = engine.allreduce_gradients

        def timed(*args, **kwargs):
            with self.phase("comm"):
                return reduce(*args, **kwargs)

        engine.allreduce_gradients = timed

    def report(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase over the steps finished since the last report
        ({} if none has); resets. `step` is the sum of the phases."""
        while self._pending and _done(self._pending[0]):
            self._add(self._pending.pop(0))
        if not self._steps:
            return {}
        out = {name: self._totals[name] / self._steps for name in PHASES}
        out["step"] = sum(out.values())
        self._totals, self._steps = dict.fromkeys(PHASES, 0.0), 0
        return out

    def _add(self, step: _Step) -> None:
        for name, ms in step.host_ms.items():
            self._totals[name] += ms
        for name, parent, start, end in step.events:
            ms = start.elapsed_time(end)
            self._totals[name] += ms
            if parent:
                self._totals[parent] -= ms
        self._steps += 1


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _done(step: _Step) -> bool:
    return all(end.query() for _, _, _, end in step.events)


def format_breakdown(ms: dict[str, float]) -> str:
    """`data 1.2 fwd 30.1 bwd 55.0 comm 3.2 opt 8.0 ms` for the progress line."""
    short = {"data": "data", "forward": "fwd", "backward": "bwd", "comm": "comm", "optimizer": "opt"}
    return " ".join(f"{short[p]} {ms[p]:.1f}" for p in PHASES) + " ms"
