"""`python -m tests.adversarial.disk_full_during_save <step> <vlpt args>`: `vlpt` whose file
writes fail with a real OS error from the save of optimizer step `<step>` on.

There the process's file-size limit drops to 4 KiB, with SIGXFSZ ignored, so the kernel
answers the checkpoint's writes with EFBIG ("File too large"), as a full disk answers with
ENOSPC: the save sees the error the system gives, midway through its files.
"""
import resource
import signal
import sys

import trainer.checkpoint as ckpt
from trainer.cli import main

FAIL_AT = int(sys.argv[1])
LIMIT_BYTES = 4096
_save = ckpt.save_checkpoint


def save_on_a_full_disk(engine, run_dir, step, *args, **kwargs):
    if step == FAIL_AT:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return _save(engine, run_dir, step, *args, **kwargs)


ckpt.save_checkpoint = save_on_a_full_disk
sys.exit(main(sys.argv[2:]))
