"""`python -m tests.kill_during_save <step> <vlpt args>`: run `vlpt`, SIGKILL itself mid-save.

At the save of optimizer step `<step>`, the process kills itself right after DeepSpeed
wrote its model and optimizer files, before the checkpoint is complete: the moment a
preempted or OOM-killed job dies in the middle of writing a checkpoint.
"""
import os
import signal
import sys

import trainer.checkpoint as ckpt
from vlpt.cli import main

KILL_AT = int(sys.argv[1])
_save = ckpt.save_checkpoint


def save_or_die(engine, run_dir, step, *args, **kwargs):
    if step == KILL_AT:
        write_deepspeed_files = engine.save_checkpoint

        def write_then_die(*a, **kw):
            write_deepspeed_files(*a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        engine.save_checkpoint = write_then_die
    return _save(engine, run_dir, step, *args, **kwargs)


ckpt.save_checkpoint = save_or_die
sys.exit(main(sys.argv[2:]))
