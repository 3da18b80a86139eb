"""Region shards without conf and soft labels (a bottom-up-attention TSV without cls_prob / objects_conf):
`vlpt pretrain` trains MLM + ITM + MRFR on them, and refuses MRC / MRC-kl at start with one line naming
the task, the dataset and the missing field."""
from __future__ import annotations

import json

import pytest

from data.shards import read_manifest
from tests.conftest import read_metrics, run_vlpt, write_tiny_config
from tests.unit.test_region_formats import butd_fields, make_images, write_butd_tsv, write_captions


@pytest.fixture(scope="module")
def bare_regions(tmp_path_factory):
    """train (40 images x 2 captions) and val (10 x 2) region shards holding only features and boxes."""
    root = tmp_path_factory.mktemp("bare_regions")
    for split, n, seed in (("train", 40, 1), ("val", 10, 2)):
        images = make_images(n, seed=seed, conf=False, soft=False)
        for im in images:
            im["image_id"] = f"{split}-{im['image_id']}"
        tsv = write_butd_tsv(root / f"{split}.tsv", images)
        caps = write_captions(root / f"{split}-caps.json", images)
        run_vlpt(["shards", "butd-tsv", "--tsv", str(tsv), "--fields", butd_fields(images[0]), "--captions",
                  str(caps), "--out", str(root / split), "--samples-per-shard", "16", "--no-progress"])
    return root


def test_trains_mlm_itm_mrfr_without_soft_labels(bare_regions, tmp_path):
    m = read_manifest(bare_regions / "train")
    assert list(m.fields) == ["features", "norm_bb"] and m.label_dim == 0
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "cfg.yaml", bare_regions, run_dir, tasks={"mlm": 1, "itm": 1, "mrfr": 1},
                            train={"max_steps": 6, "val_every": 6})
    run_vlpt(["pretrain", "--config", str(cfg)])
    records = read_metrics(run_dir)
    trained = {k.split("_")[0] for r in records for k in r if k.endswith("_loss") and not k.startswith("val")}
    assert {"mlm", "itm", "mrfr"} <= trained, trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and set(summary["task_counts"]) <= {"mlm", "itm", "mrfr"}
    assert any(k.startswith("val/mrfr") for r in records for k in r), "MRFR validated on the bare val split"


@pytest.mark.parametrize("task", ["mrc", "mrc-kl"])
def test_mrc_refused_without_soft_labels(bare_regions, tmp_path, task):
    cfg = write_tiny_config(tmp_path / "cfg.yaml", bare_regions, tmp_path / "run", tasks={"mlm": 1, task: 1})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f"tasks.{task} needs region soft labels but data.train={bare_regions / 'train'} has none" in lines[0]
    assert "rebuild the shards" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_per_dataset_task_named(bare_regions, tmp_path):
    cfg = write_tiny_config(tmp_path / "cfg.yaml", bare_regions, tmp_path / "run", tasks={"mlm": 1},
                            data={"datasets": [{"name": "bare", "train": str(bare_regions / "train"),
                                                "tasks": {"mlm": 1, "mrc-kl": 1}}]})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2
    assert "data.datasets.bare.tasks.mrc-kl needs region soft labels but data.datasets.bare.train=" in proc.stderr
