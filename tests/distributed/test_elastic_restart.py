"""Acceptance: `kill -9` of one of 2 ranks mid-run under torchrun with one restart allowed;
the job finishes from the latest checkpoint and its losses equal the uninterrupted run's (fp32)."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_vlpt, step_losses, subprocess_env, write_equivalence_config

pytestmark = pytest.mark.slow


def config(tmp_path, demo_data, name):
    return write_equivalence_config(tmp_path, demo_data, name, max_steps=8, save_every=2)


def test_killed_rank_restarts_from_latest_checkpoint(tmp_path, demo_data):
    run_vlpt(["pretrain", "--config", str(config(tmp_path, demo_data, "full"))], launcher="torchrun", nproc=2)
    marker = tmp_path / "kill-marker.txt"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "tests.kill_rank", "1", "5", str(marker),
           "pretrain", "--config", str(config(tmp_path, demo_data, "killed"))]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert marker.read_text() == "rank 1 killed at step 5\n"
    assert "resumed from step_00000004 at step 4" in out
    ref, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):  # step 5 was logged before the kill too; the rerun's record is last
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step
