"""A run whose training data holds a caption with a lone surrogate and whose held-out split
holds a truncated tar reaches its last step, saves, and reports both in summary.json and MLflow."""
import json

import pytest

from data.demo_scenes import LABEL_DIM
from data.shards import write_manifest, write_shard
from tests.bad_input_data import IMG_DIM, bad_sample, good_samples, truncate_mid_member
from tests.conftest import run_vlpt, write_tiny_config

pytestmark = pytest.mark.slow
STEPS = 4


def write_data(root):
    train, val = root / "train", root / "val"
    pool = good_samples(40)
    surrogate = {**pool[0], "__key__": "surrogate-0",
                 "json": b'{"image_id": "img-s", "caption": "a red \\ud800 cube", "caption_id": "s"}'}
    shards = [train / "shard-000000.tar", train / "shard-000001.tar"]
    counts = [write_shard(shards[0], [surrogate] + pool[1:16]), write_shard(shards[1], pool[16:32])]
    write_manifest(train, shards, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts)
    held_out = good_samples(16, split="val")
    vshards = [val / "shard-000000.tar", val / "shard-000001.tar"]
    vcounts = [write_shard(vshards[0], held_out[:7] + [bad_sample("nonfinite_features", "bad-val")]),
               write_shard(vshards[1], held_out[8:])]
    write_manifest(val, vshards, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, vcounts)
    truncate_mid_member(vshards[1], 2 * 2 + 1)


@pytest.mark.parametrize("nproc", [1, 2])
def test_bad_train_caption_and_truncated_val_tar(tmp_path, outside_guard, nproc):
    """With 2 ranks the counts are the same: shard damage is counted once, bad samples by the
    rank they fall to, summed; both ranks take the same path through the damaged validation."""
    _, run_dir = outside_guard
    write_data(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "data", run_dir, tasks={"mlm": 1, "itm": 0},
                            data={"shuffle_buffer": 0, "val_batch_size": 4},
                            train={"max_steps": STEPS, "log_every": 1, "val_every": 2},
                            tracking={"enabled": True})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False, launcher="torchrun" if nproc > 1 else "python",
                    nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert "bad held-out      skipped in the final validation: corrupt_tar=1, nonfinite_features=1" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["val_data_skipped"] == {"corrupt_tar": 1, "nonfinite_features": 1}  # the final validation's
    assert summary["data_skipped"] == {"bad_caption": nproc}  # 2 ranks: 2 epochs in 4 steps

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_data/skipped_corrupt_tar")
    assert sorted((m.step, m.value) for m in history) == [(2, 1.0), (STEPS, 1.0)]
    assert client.get_metric_history(run.info.run_id, "val_data/skipped_nonfinite_features")[-1].value == 1
    assert run.data.metrics["data/skipped_bad_caption"] == nproc
