"""One run per run dir: a second live run is refused with one line naming the holder; a
lock left by a dead process on this host (a killed run, a rank 0 torchrun restarts) is
taken over with a warning; the lock is released when the run ends."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import run_vlpt, write_tiny_config
from trainer.run_lock import LOCK_FILE, RunLock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_holder():
    """A live process (not this one) that stands for the first run."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(run_dir, host: str, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00"}))


def test_acquire_then_release(tmp_path):
    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()
    held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert sorted(os.listdir(tmp_path / "run")) == [LOCK_FILE]  # no private temp file left
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["this_host", "other_host"])
def test_a_live_or_unverifiable_holder_refuses_with_one_line(tmp_path, live_holder, where):
    host = socket.gethostname() if where == "this_host" else "node-17.cluster"
    write_lock(tmp_path / "run", host, live_holder)
    with pytest.raises(ValueError) as err:
        RunLock(str(tmp_path / "run")).acquire()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert f"is in use by another run (pid {live_holder} on {host}" in msg and LOCK_FILE in msg
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == live_holder  # untouched


@pytest.mark.parametrize("content", ["dead_pid", "garbage"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, content):
    run_dir = tmp_path / "run"
    if content == "dead_pid":
        write_lock(run_dir, socket.gethostname(), dead_pid())
    else:
        run_dir.mkdir()
        (run_dir / LOCK_FILE).write_text('{"host": "x", "pi')
    lock = RunLock(str(run_dir))
    lock.acquire()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(f"taking over {run_dir / LOCK_FILE}"), warned
    lock.release()


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path, live_holder):
    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()
    write_lock(tmp_path / "run", socket.gethostname(), live_holder)  # a takeover after we looked dead
    lock.release()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == live_holder


@pytest.mark.slow
def test_a_second_run_in_the_same_run_dir_is_refused(tmp_path, demo_data, live_holder, outside_guard):
    _, run_dir = outside_guard
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 2})
    write_lock(run_dir, socket.gethostname(), live_holder)  # the first run, still training

    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlpt: error: train.run_dir={run_dir} is in use by another run "
                           f"(pid {live_holder} on {socket.gethostname()}"), last
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE]  # no config, metrics or checkpoint written

    write_lock(run_dir, socket.gethostname(), dead_pid())  # the first run was killed
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert f"taking over {run_dir / LOCK_FILE}" in proc.stderr
    assert (run_dir / "summary.json").is_file() and not (run_dir / LOCK_FILE).exists()
