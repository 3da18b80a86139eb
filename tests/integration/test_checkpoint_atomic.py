"""Acceptance: a kill during checkpoint writing leaves the previous checkpoint loadable and
`latest` pointing to it; the resumed run then matches an uninterrupted one."""
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_vlpt, step_losses, subprocess_env, write_tiny_config

pytestmark = pytest.mark.slow


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, demo_data):
    common = dict(train={"max_steps": 6, "save_every": 2, "keep_last": 5}, data={"shuffle_buffer": 64})
    full = tmp_path / "full"
    run_vlpt(["pretrain", "--config", str(write_tiny_config(tmp_path / "a.yaml", demo_data, full, **common))])

    run_dir = tmp_path / "killed"
    cfg = write_tiny_config(tmp_path / "b.yaml", demo_data, run_dir, **common)
    proc = subprocess.run([sys.executable, "-m", "tests.kill_during_save", "4", "pretrain", "--config", str(cfg)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / "step_00000002" / "trainer_state.json").is_file()
    assert not (root / "step_00000004").exists()
    partial = root / ".tmp-step_00000004"
    assert partial.is_dir() and any(partial.iterdir())  # DeepSpeed had written its files
    assert not (partial / "trainer_state.json").exists()

    resumed = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "resumed from step_00000002 at step 2" in resumed.stderr + resumed.stdout
    assert not partial.exists()  # cleaned by the next save
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004", "step_00000006"]
    ref, got = step_losses(full), step_losses(run_dir)
    for step in range(3, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step
