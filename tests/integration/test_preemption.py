"""SIGTERM (Slurm requeue or preemption, pod deletion, torchrun restart) or Ctrl-C: the run
finishes the step in flight, saves a checkpoint on every rank, exits 128 + the signal with
one line, and the same command resumes from there."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, read_metrics, run_vlpt, subprocess_env, write_tiny_config

pytestmark = pytest.mark.slow


def wait_for_step(run_dir, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_sigterm_saves_and_the_same_command_resumes(tmp_path, demo_data, launcher):
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 1000})
    if launcher == "python":
        cmd = [sys.executable, "-m", "vlpt"]
    else:  # torchrun passes SIGTERM on to its workers
        cmd = [str(sys.executable).rsplit("/", 1)[0] + "/torchrun", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "vlpt"]
    proc = subprocess.Popen([*cmd, "pretrain", "--config", str(cfg)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 3 <= step < 1000
    assert f"vlpt: stopped by SIGTERM after step {step}; checkpoint {run_dir / 'checkpoints' / latest}" in err
    if launcher == "python":
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    else:
        assert proc.returncode != 0, err[-3000:]
    assert not (run_dir / "summary.json").exists()

    resumed = run_vlpt(["pretrain", "--config", str(cfg), f"--train.max_steps={step + 2}"],
                       launcher=launcher, nproc=2)
    assert f"resumed from {latest} at step {step}" in resumed.stderr
    assert (run_dir / "summary.json").exists()
