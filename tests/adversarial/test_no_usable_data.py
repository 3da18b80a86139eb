"""Training data of which nothing can be read (every listed shard gone) is not a bad sample
to count but a dataset to fix: the run stops with one line and exit 2, in a DataLoader
worker as in the main process, instead of a traceback that every restart repeats."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_vlpt, write_tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_training_shards_all_gone_is_one_line(tmp_path, demo_data, workers):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for shard in (data / "train").glob("*.tar"):
        shard.unlink()  # listed in the manifest, vanished since
    cfg = write_tiny_config(tmp_path / "c.yaml", data, tmp_path / "run", data={"num_workers": workers})

    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False, timeout=300)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlpt: error: dataset 'train'") or last.startswith("vlpt: error: reader 0"), last
    assert "no readable sample" in last or "no samples" in last, last
    assert "NoUsableData" not in last
