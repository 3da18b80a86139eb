"""Bad input end to end (docs/data.md, "Bad and hostile input"): every skip reason counted exactly, and
the abort threshold."""
import json

import pytest

from tests.bad_input_data import epoch_shard_order, write_bad_dataset
from tests.conftest import read_metrics, run_vlpt, write_tiny_config

pytestmark = pytest.mark.slow
SEED, BATCH, READABLE_BATCHES = 7, 8, 6
# The manifest lists the truncated shard's 10 samples (7 readable): 51 samples make an
# epoch of 7 batches (5 x 8, then 6 + 5 planned; the last holds the 2 left).
STEPS = 7


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_run_data")
    # The corrupt shard is read first, so its damage is met inside the epoch's batches.
    expected = write_bad_dataset(out, batch_size=BATCH, n_batches=READABLE_BATCHES,
                                 corrupt_first=epoch_shard_order(3, SEED, "mlm")[0])
    return out, expected


def config(tmp_path, data_dir, run_dir, **data):
    """Exactly one epoch of one MLM reader: STEPS batches."""
    return write_tiny_config(tmp_path / "c.yaml", data_dir, run_dir, tasks={"mlm": 1, "itm": 0},
                             data={"val": None, "micro_batch_size": BATCH, "shuffle_buffer": 0, **data},
                             train={"max_steps": STEPS, "log_every": 2, "seed": SEED},
                             tracking={"enabled": True})


def test_every_bad_sample_is_counted_and_the_run_finishes(tmp_path, bad_data):
    data_dir, expected = bad_data
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, data_dir, run_dir)
    # Stop half-way and resume: the totals of the first part must survive the restart.
    first = run_vlpt(["pretrain", "--config", str(cfg), "--train.stop_after_steps=3"])
    assert "skipping the rest of corrupt shard" in first.stderr  # read in the first batch
    part = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert 0 < part["data_seen"] < expected["seen"]
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "vlpt pretrain: done" in proc.stdout and "bad samples" in proc.stdout
    assert part["data_skipped"]["corrupt_tar"] == 1

    state = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["data_skipped"] == expected["skipped"]
    assert state["data_seen"] == expected["seen"]
    mlm = state["positions"]["mlm"]
    assert mlm["steps"] == {"0": STEPS} and mlm["n_readers"] == 1
    assert mlm["readers"]["0"]["epoch"] == 0  # exactly the first epoch, read to its end
    last = [r for r in read_metrics(run_dir) if "data/skipped_per_1000" in r][-1]
    assert last["step"] == STEPS
    # The caption over data.max_txt_len is filtered by length, not bad input (docs/data.md).
    bad_input = {k: v for k, v in expected["skipped"].items() if k != "caption_too_long"}
    assert {k[len("data/skipped_"):]: v for k, v in last.items()
            if k.startswith("data/skipped_") and k != "data/skipped_per_1000"} == bad_input
    assert last["data/filtered_length"] == expected["skipped"]["caption_too_long"] == 1
    bad = sum(bad_input.values())
    assert last["data/skipped_per_1000"] == pytest.approx(1000 * bad / expected["seen"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_skipped"] == bad_input and summary["data_seen"] == expected["seen"]
    assert summary["data_filtered_length"] == 1 and "filtered by length 1 of" in proc.stdout

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/skipped_nonfinite_features"] == 1


def test_too_many_bad_samples_is_one_line_exit_2(tmp_path, bad_data):
    data_dir, _ = bad_data
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, data_dir, run_dir, max_bad_per_1000=1, min_samples_for_bad_rate=8)
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlpt: error:")]
    assert len(errors) == 1 and "data.max_bad_per_1000=1" in errors[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert " of 16 samples were bad" in errors[0]  # log_every=2: decided at step 2
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vlpt").experiment_id])
    assert run.info.status == "FAILED"
