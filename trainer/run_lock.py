"""One run per run dir: `<run_dir>/.vlpt.lock`, held by global rank 0 for the whole run.

The lock file is JSON (host, pid, start time) and appears whole or not at all: it is
written under a private name and hard-linked into place, which fails if it exists. A
second run finds it and stops with one line naming the holder. A lock whose holder is a
dead process on this host (a killed run, or a rank 0 that torchrun is restarting) is
stale: it is taken over with a warning. A holder on another host cannot be checked from
here, so that lock is only ever removed by hand.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Iterator, Optional

from trainer.config_files import ConfigError
from trainer.distributed import DistInfo, all_gather_objects

log = logging.getLogger(__name__)

LOCK_FILE = ".vlpt.lock"


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def acquire(self) -> None:
        """Take the lock; ValueError (one line) when a live run holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):  # a stale lock is removed once, then taken like a free one
            if self._link_new():
                return
            holder = self._holder()
            if holder is not None and not self._is_stale(holder):
                raise ValueError(f"train.run_dir={os.path.dirname(self.path)} is in use by another run "
                                 f"(pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}); "
                                 f"wait for it to end, or delete {self.path} if that run is gone")
            log.warning("taking over %s: its run (%s) is no longer alive", self.path,
                        "unreadable lock" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}")
            with contextlib.suppress(FileNotFoundError):  # another process took it over first
                os.unlink(self.path)
        raise ValueError(f"train.run_dir={os.path.dirname(self.path)}: another run took {self.path} while this "
                         "one was taking over a stale lock; only one run may use a run dir")

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover may have replaced it)."""
        holder = self._holder()
        if holder is not None and holder.get("host") == self.mine["host"] and holder.get("pid") == self.mine["pid"]:
            os.unlink(self.path)

    def _link_new(self) -> bool:
        private = f"{self.path}.{self.mine['host']}.{self.mine['pid']}"
        with open(private, "w") as f:
            json.dump(self.mine, f)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(private)

    def _holder(self) -> Optional[dict]:
        """The lock's content; None when it vanished or is not our JSON (then it is stale:
        a lock file appears whole, so a live holder's file always parses)."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != self.mine["host"] or not isinstance(holder.get("pid"), int):
            return False
        return holder["pid"] == self.mine["pid"] or not _alive(holder["pid"])  # our own pid: an earlier life


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def hold_run_lock(run_dir: str, info: DistInfo) -> Iterator[None]:
    """Collective. Global rank 0 holds the run dir's lock for the block; when it cannot, every
    rank raises the same one-line ConfigError."""
    lock, error = RunLock(run_dir), None
    if info.is_main:
        try:
            lock.acquire()
        except ValueError as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if info.is_main:
            lock.release()
