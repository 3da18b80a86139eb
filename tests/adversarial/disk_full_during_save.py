"""`python -m tests.adversarial.disk_full_during_save <step> <how> <vlpt args>`: `vlpt` whose
file writes fail with a real OS error from the save of optimizer step `<step>` on.

`<how>` is `fsize` or `fill:<path>`. `fsize`: the process's file-size limit drops to 4 KiB,
with SIGXFSZ ignored, so the kernel answers the checkpoint's writes with EFBIG ("File too
large"). `fill:<path>`: a file at `<path>` takes every free byte of its filesystem (the test
mounts a small tmpfs for the run dir), so the writes get ENOSPC as on a full disk. Either way
the save sees the error the system gives, midway through its files.
"""
import errno
import resource
import signal
import sys

import trainer.checkpoint as ckpt
from vlpt.cli import main

FAIL_AT, HOW = int(sys.argv[1]), sys.argv[2]
LIMIT_BYTES = 4096
_save = ckpt.save_checkpoint


def fill_filesystem(path: str) -> None:
    """Write `path` until its filesystem has no byte left."""
    with open(path, "wb", buffering=0) as f:
        chunk = 1 << 20
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2


def save_on_a_full_disk(engine, run_dir, step, *args, **kwargs):
    if step == FAIL_AT and HOW == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif step == FAIL_AT:
        fill_filesystem(HOW.removeprefix("fill:"))
    return _save(engine, run_dir, step, *args, **kwargs)


ckpt.save_checkpoint = save_on_a_full_disk
sys.exit(main(sys.argv[3:]))
