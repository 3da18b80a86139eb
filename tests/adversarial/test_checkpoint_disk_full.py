"""A save that fails with an OS error (here EFBIG from the kernel, as ENOSPC on a full disk)
ends the run with one line naming the error and the path; the previous checkpoint stays
`latest` and resumes, and no temp folder is left behind."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, run_vlpt, subprocess_env, write_tiny_config

pytestmark = pytest.mark.slow


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, demo_data, outside_guard):
    _, run_dir = outside_guard
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 6, "save_every": 2})
    proc = subprocess.run([sys.executable, "-m", "tests.adversarial.disk_full_during_save", "4",
                           "pretrain", "--config", str(cfg)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    root = run_dir / "checkpoints"
    assert last.startswith("vlpt: error: checkpoint step_00000004 not saved"), last
    assert "[Errno 27] File too large" in last and str(root / ".tmp-step_00000004") in last, last
    assert "`latest` still names step_00000002" in last, last

    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no .tmp-*, no latest.tmp

    resumed = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=3"])
    assert "resumed from step_00000002 at step 2" in resumed.stderr
