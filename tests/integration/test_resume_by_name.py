"""A run is named by its config (`runs/<config stem>`, relative to the working directory), so the
same `vlpt pretrain --config X` command, stopped by SIGTERM and run again, resumes the same run;
`train.resume: never | must` turn a surprise into one line, and a bad config leaves no folder."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import run_vlpt, step_losses, subprocess_env, write_tiny_config
from tests.integration.test_preemption import wait_for_step

pytestmark = pytest.mark.slow

STEPS = 60  # far more than the few steps the stopped run makes before SIGTERM reaches it


def config_without_run_dir(path, demo_data):
    """The tiny run (fp32, dropout on: the restored RNG matters) with train.run_dir left to its default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_config(path, demo_data, path.parent / "unused", train={"max_steps": STEPS, "log_every": 1},
                      data={"shuffle_buffer": 64})
    cfg = yaml.safe_load(path.read_text())
    del cfg["train"]["run_dir"]
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlpt: error:"), proc.stderr[-3000:]
    return lines[0]


def test_the_same_command_resumes_after_sigterm(tmp_path, demo_data):
    cfg = config_without_run_dir(tmp_path / "configs" / "tiny.yaml", demo_data)
    ref_cwd, cwd = tmp_path / "ref", tmp_path / "work"
    ref_cwd.mkdir()
    cwd.mkdir()
    run_vlpt(["pretrain", "--config", str(cfg)], cwd=ref_cwd)
    ref = step_losses(ref_cwd / "runs" / "tiny")

    command = [sys.executable, "-m", "vlpt", "pretrain", "--config", str(cfg)]
    run_dir = cwd / "runs" / "tiny"  # the default name, in the working directory
    proc = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "the same command resumes from it" in err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < STEPS

    resumed = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest} at step {stopped_at}" in resumed.stderr
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["tiny"]  # no second folder
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(stopped_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step

    # resume: never refuses the run dir that now holds checkpoints; must refuses an empty one.
    never = run_vlpt(["pretrain", "--config", str(cfg), "--train.resume=never"], cwd=cwd, check=False)
    assert "use a new name" in one_error_line(never) and "train.resume=auto" in never.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    must = run_vlpt(["pretrain", "--config", str(cfg), "--train.resume=must"], cwd=empty, check=False)
    assert "holds no checkpoint" in one_error_line(must)
    assert not (empty / "runs").exists()


def test_a_bad_config_leaves_no_run_folder(tmp_path, demo_data):
    cfg = config_without_run_dir(tmp_path / "tiny.yaml", demo_data)
    for bad in ("--model.vocab_size=7", "--model.hiden_size=3"):  # found against the data / by the loader
        proc = run_vlpt(["pretrain", "--config", str(cfg), bad], cwd=tmp_path, check=False)
        one_error_line(proc)
        assert not (tmp_path / "runs").exists(), bad
