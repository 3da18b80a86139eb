"""Rank-0 progress: a tqdm bar (step, per-task loss, samples/s, ETA) and periodic log lines."""
from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

from trainer.step_timer import format_breakdown


class Progress:
    def __init__(self, enabled: bool, start: int, total: int, log_every: int = 10, bar: bool = True):
        """`enabled`: this rank prints (rank 0); `bar`: draw the tqdm bar (log lines print regardless)."""
        self.enabled, self.log_every = enabled, log_every
        self.bar = tqdm(total=total, initial=start, disable=not (enabled and bar), dynamic_ncols=True,
                        mininterval=0.5, file=sys.stderr, unit="step")
        self.window: dict[str, list[float]] = {}
        self.samples, self.t0 = 0, time.time()
        self.skipped = 0
        """Bad samples skipped so far in the whole run (all ranks), set by the loop."""
        self.retries = 0
        """S3 retries so far in this process's run (all ranks), set by the loop."""

    def update(self, step: int, task: str, stats: dict[str, float], batch_size: int,
               times: Optional[dict[str, float]] = None) -> None:
        """`times`: the step-time breakdown (trainer/step_timer.py), given on log steps."""
        for k, v in stats.items():
            self.window.setdefault(f"{task}_{k}", []).append(v)
        self.samples += batch_size
        rate = self.samples / max(time.time() - self.t0, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{task} loss {stats.get('loss', float('nan')):.3f} | {rate:.0f} samples/s",
                                 refresh=False)
        if step % self.log_every == 0:
            parts = [f"{k} {sum(v) / len(v):.4f}" for k, v in sorted(self.window.items())]
            skipped = f"  | {self.skipped:,} bad samples skipped" if self.skipped else ""
            retries = f"  | {self.retries:,} S3 retries" if self.retries else ""
            breakdown = f"  | {format_breakdown(times)}" if times else ""
            self.write(f"step {step}: " + "  ".join(parts) + f"  | {rate:.0f} samples/s" + breakdown + skipped
                       + retries)
            self.window.clear()

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
