"""`python -m tests.kill_rank <rank> <step> <marker> <vlpt args>`: `vlpt`, whose rank `<rank>`
SIGKILLs itself during optimizer step `<step>` — once: the marker file records that it did,
so the restarted worker group runs through (a node lost once, then replaced)."""
import os
import signal
import sys
from pathlib import Path

import trainer.run as run
from vlpt.cli import main

RANK, STEP, MARKER = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
_optimizer_step = run.optimizer_step
_steps = [0]


def optimizer_step_or_die(*args, **kwargs):
    _steps[0] += 1
    stats = _optimizer_step(*args, **kwargs)
    # The first attempt starts at step 0, so its count of calls is the step number.
    if int(os.environ.get("RANK", "0")) == RANK and _steps[0] == STEP and not MARKER.exists():
        MARKER.write_text(f"rank {RANK} killed at step {STEP}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return stats


run.optimizer_step = optimizer_step_or_die
sys.exit(main(sys.argv[4:]))
