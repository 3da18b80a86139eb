"""A save that fails with an OS error (EFBIG from the kernel under a file-size limit; ENOSPC
on a real full filesystem, a small tmpfs where the test may mount one) ends the run with one
line naming the error and the path; the previous checkpoint stays `latest` and resumes, and
no temp folder is left behind."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_vlpt, subprocess_env, write_tiny_config

pytestmark = pytest.mark.slow


def save_fails_at_step_4(cfg: Path, how: str) -> str:
    """Run to the failing save; assert exit 3 and no traceback; the last stderr line."""
    proc = subprocess.run([sys.executable, "-m", "tests.adversarial.disk_full_during_save", "4", how,
                           "pretrain", "--config", str(cfg)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def assert_previous_checkpoint_kept(run_dir: Path, last: str, errno_text: str) -> None:
    root = run_dir / "checkpoints"
    assert last.startswith("vlpt: error: checkpoint step_00000004 not saved"), last
    assert errno_text in last and str(root / ".tmp-step_00000004") in last, last
    assert "`latest` still names step_00000002" in last, last
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no .tmp-*, no latest.tmp


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, demo_data, outside_guard):
    _, run_dir = outside_guard
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 6, "save_every": 2})
    last = save_fails_at_step_4(cfg, "fsize")
    assert_previous_checkpoint_kept(run_dir, last, "[Errno 27] File too large")

    resumed = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=3"])
    assert "resumed from step_00000002 at step 2" in resumed.stderr


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` for the block; skips where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_filesystem_keeps_the_previous_checkpoint(tmp_path, demo_data):
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        run_dir, filler = disk / "run", disk / "filler"
        cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 6, "save_every": 2})
        last = save_fails_at_step_4(cfg, f"fill:{filler}")
        assert_previous_checkpoint_kept(run_dir, last, "[Errno 28] No space left on device")
        filler.unlink()  # space again: the same command resumes
        resumed = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=3"])
        assert "resumed from step_00000002 at step 2" in resumed.stderr
