"""End-to-end `vlpt pretrain` with `data.datasets`: several datasets, each with its own task mix.

Three datasets: "a" (the session demo shards, tasks mlm + itm, with val), "b" (a second demo
dataset of another seed, tasks mrfr + mrc-kl, with val) and "c" (b's training shards, no val,
no `tasks`: it inherits the top-level `tasks`, whose zero-ratio entry is dropped). Every mix
entry is keyed "dataset/task"; the keys name the loaders, their resume positions, the
metrics and the task counts.
"""
import json
from collections import Counter

import pytest

from tests.conftest import read_metrics, run_vlpt, step_losses, write_tiny_config

pytestmark = pytest.mark.slow

SEED = 7  # write_tiny_config's train.seed
MAX_STEPS = 12  # with seed 7 the first 12 draws cover every key of MIX
TOP_LEVEL_TASKS = {"mlm": 1, "itm": 0, "mrc": 1}  # deep-merged over write_tiny_config's {mlm, itm}
MIX = {"a/itm": 1.0, "a/mlm": 1.0, "b/mrc-kl": 1.0, "b/mrfr": 1.0, "c/mlm": 1.0, "c/mrc": 1.0}
WITH_VAL = {"a/itm", "a/mlm", "b/mrc-kl", "b/mrfr"}


@pytest.fixture(scope="module")
def second_data(tmp_path_factory):
    from data.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("demo_b")
    write_demo_dataset(str(out), seed=1, n_train_scenes=32, n_val_scenes=8, img_dim=16,
                       scenes_per_shard=16)
    return out


def datasets(demo_data, second_data):
    return [
        {"name": "a", "train": str(demo_data / "train"), "val": str(demo_data / "val"),
         "tasks": {"mlm": 1, "itm": 1}},
        {"name": "b", "train": str(second_data / "train"), "val": str(second_data / "val"),
         "tasks": {"mrfr": 1, "mrc-kl": 1}},
        {"name": "c", "train": str(second_data / "train")},  # no val, no tasks
    ]


def multi_config(path, run_dir, demo_data, second_data, **sections):
    # data.train / data.val of write_tiny_config stay set: `datasets` replaces them.
    sections = {"tasks": TOP_LEVEL_TASKS, **sections}
    sections["data"] = {"datasets": datasets(demo_data, second_data), **sections.get("data", {})}
    return write_tiny_config(path, demo_data, run_dir, **sections)


def expected_draws():
    from trainer.task_mix import draw_task

    return [draw_task(SEED, step, MIX) for step in range(MAX_STEPS)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, demo_data, second_data):
    tmp = tmp_path_factory.mktemp("multi")
    run_dir = tmp / "run"
    cfg = multi_config(tmp / "c.yaml", run_dir, demo_data, second_data,
                       train={"max_steps": MAX_STEPS}, tracking={"enabled": True})
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    return run_dir, proc


def test_config_resolves_to_the_expected_mix(tmp_path, demo_data, second_data):
    """In-process: the YAML gives the mix keys (c inherits the top level, ratio-0 itm dropped)."""
    from trainer.config import load_config
    from trainer.task_mix import mix_ratios, task_mix

    cfg = load_config(str(multi_config(tmp_path / "c.yaml", tmp_path / "run", demo_data, second_data)))
    assert mix_ratios(cfg) == MIX
    entries = {e.key: e for e in task_mix(cfg)}
    assert entries["c/mrc"].task == "mrc" and entries["c/mrc"].dataset == "c"
    assert entries["c/mlm"].sources[0].val is None and entries["b/mrfr"].sources[0].val == str(second_data / "val")
    assert entries["a/mlm"].sources[0].train == str(demo_data / "train")
    assert set(expected_draws()) == set(MIX), "seed 7 no longer draws every key in 12 steps"


def test_run_metrics_state_and_summary_use_mix_keys(full_run):
    run_dir, proc = full_run
    assert "vlpt pretrain: done" in proc.stdout
    draws = expected_draws()

    records = read_metrics(run_dir)
    train = [r for r in records if "task" in r]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert [r["task"] for r in train] == draws
    for rec in train:
        key = rec["task"]
        assert f"{key}_loss" in rec, rec
        assert 0 < rec[f"{key}_loss"] < 50, rec
        # Only this step's key is reported, and never under a bare task name.
        others = [k for k in rec if k not in ("step", "task", "lr", "grad_norm")
                  and not k.startswith((key + "_", "time/"))]
        assert others == [], rec
    by_key = {r["task"]: r for r in train}
    assert {"a/mlm_acc", "a/mlm_loss"} <= set(by_key["a/mlm"])
    assert {"b/mrfr_mse_per_region", "b/mrc-kl_kl", "c/mrc_acc"} <= (
        set(by_key["b/mrfr"]) | set(by_key["b/mrc-kl"]) | set(by_key["c/mrc"]))

    val = {k: v for r in records for k, v in r.items() if k.startswith("val/")}
    for name in ("val/a/mlm_acc", "val/a/mlm_loss", "val/a/itm_acc", "val/a/itm_loss",
                 "val/b/mrfr_mse_per_region", "val/b/mrfr_loss", "val/b/mrc-kl_kl", "val/b/mrc-kl_acc"):
        assert name in val, (name, sorted(val))
    # Validation runs for exactly the keys whose dataset has `val`; nothing for c.
    owners = {k: [m for m in MIX if k.startswith(f"val/{m}_")] for k in val}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert {o[0] for o in owners.values()} == WITH_VAL, sorted(val)
    assert not [k for k in val if k.startswith("val/c/")]
    assert all(v == v and abs(v) < 1e6 for v in val.values())  # finite

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    assert summary["task_counts"] == dict(Counter(draws))
    assert set(summary["task_counts"]) <= set(MIX)
    assert "val/b/mrfr_mse_per_region" in summary and "val/c/mlm_loss" not in summary

    state = json.loads((run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}" / "trainer_state.json").read_text())
    assert set(state["positions"]) == set(MIX)  # every loader, drawn or not
    assert state["task_counts"] == summary["task_counts"]
    for key in MIX:  # one stream (no accumulation, one rank), advanced once per draw
        pos = state["positions"][key]
        assert pos["steps"] == {"0": summary["task_counts"].get(key, 0)}, (key, pos)
        assert set(pos["readers"]) == ({"0"} if key in summary["task_counts"] else set())

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert "a/mlm_loss" in run.data.metrics and "val/b/mrfr_mse_per_region" in run.data.metrics
    assert "MLflow: could not" not in proc.stdout + proc.stderr  # every metric name was accepted


def test_resume_equals_uninterrupted(tmp_path, demo_data, second_data, full_run):
    """Positions keyed "dataset/task" restore every loader: the resumed run's losses equal the
    uninterrupted run's (dropout on, fp32)."""
    ref_dir, _ = full_run
    part = tmp_path / "part"
    cfg = multi_config(tmp_path / "c.yaml", part, demo_data, second_data, train={"max_steps": MAX_STEPS})
    run_vlpt(["pretrain", "--config", str(cfg), "--train.stop_after_steps=5"])
    assert sorted(step_losses(part)) == [1, 2, 3, 4, 5]
    run_vlpt(["pretrain", "--config", str(cfg)])
    ref, got = step_losses(ref_dir), step_losses(part)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


@pytest.mark.parametrize("case,needle", [
    ("unknown_task", "data.datasets.b.tasks"),
    ("duplicate_name", "data: datasets: names must be unique"),
    ("missing_train", "data.datasets.b.train"),
    ("missing_val", "data.datasets.a.val"),
    ("unknown_key", "data.datasets[2].tasx"),
])
def test_dataset_user_errors_are_one_line(tmp_path, demo_data, second_data, case, needle):
    ds = datasets(demo_data, second_data)
    if case == "unknown_task":
        ds[1]["tasks"] = {"mrfr": 1, "mrm": 1}
    elif case == "duplicate_name":
        ds[2]["name"] = "a"
    elif case == "missing_train":
        ds[1]["train"] = str(tmp_path / "nowhere" / "train")
    elif case == "missing_val":
        ds[0]["val"] = str(tmp_path / "nowhere" / "val")
    elif case == "unknown_key":
        ds[2]["tasx"] = {"mlm": 1}
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", data={"datasets": ds})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("vlpt: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if case == "unknown_task":
        assert "'mrm'" in err[0]
    if case == "duplicate_name":
        assert "unique" in err[0]
    if case.startswith("missing"):
        assert "nowhere" in err[0] and not (tmp_path / "run").exists()  # failed before any work
