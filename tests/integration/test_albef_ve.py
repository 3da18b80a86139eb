"""ALBEF visual entailment through `vlpt finetune` / `vlpt evaluate` on the demo's VE task folders joined to the
pixel demo's pictures (the same scenes), from a tiny ALBEF pretraining run (fp32, no dropout):

- the run starts from the pretraining student and teacher (a new cls_head, copied into the teacher), trains and
  validates accuracy;
- 2 processes give the losses of 1 process with the same global batch; a resumed run the uninterrupted one's;
- `vlpt evaluate` writes predictions.csv, and an independent scorer of it gets the same accuracy.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.conftest import read_metrics, run_vlpt, write_albef_task_config

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def ve_tasks(pixel_tasks):
    return pixel_tasks / "ve"


def ve_config(tmp_path, pixel_data, ve_tasks, name, init_from, **sections):
    return write_albef_task_config(tmp_path, pixel_data, ve_tasks.parent, "ve", name, STEPS, init_from, **sections)


def losses(run_dir) -> dict:
    return {r["step"]: (r["ve_loss"], r["ve_acc"]) for r in read_metrics(run_dir) if "ve_loss" in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data, ve_tasks, albef_pretrained):
    tmp = tmp_path_factory.mktemp("albef_ve_one")
    proc = run_vlpt(["finetune", "--config", str(ve_config(tmp, pixel_data, ve_tasks, "one", albef_pretrained))])
    return tmp / "one", proc


def test_fine_tunes_from_the_pretraining_student_and_teacher(one_process, albef_pretrained):
    run_dir, proc = one_process
    assert "cls_head.*: new; dropped: itm_head.*, temp, text_encoder.cls.*, text_proj.*, vision_proj.*" in proc.stderr
    assert "teacher: loaded, its cls_head a copy of the student's" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["grad_accum"], summary["global_batch_size"]) == (1, 2, 16)
    assert 0.0 <= summary["val/ve_acc"] <= 1.0 and sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    teacher = torch.load(ckpt / "teacher.pt", weights_only=True)
    pre_ckpt = albef_pretrained / "checkpoints" / (albef_pretrained / "checkpoints" / "latest").read_text().strip()
    pre_teacher = torch.load(pre_ckpt / "teacher.pt", weights_only=True)
    assert "model.cls_head.2.weight" in teacher and not any(k.startswith("model.vision_proj") for k in teacher)
    # the EMA moved the loaded teacher only a little from the pretraining teacher's weights
    key = "text_encoder.embeddings.word_embeddings.weight"
    assert (teacher["model." + key] - pre_teacher[key]).abs().max() < 0.1


def test_two_processes_match_one_and_resume_is_exact(tmp_path, pixel_data, ve_tasks, albef_pretrained, one_process):
    ref = losses(one_process[0])
    two = ve_config(tmp_path, pixel_data, ve_tasks, "two", albef_pretrained)
    run_vlpt(["finetune", "--config", str(two)], launcher="torchrun", nproc=2)
    resumed = ve_config(tmp_path, pixel_data, ve_tasks, "resumed", albef_pretrained, train={"save_every": 2})
    run_vlpt(["finetune", "--config", str(resumed), "--train.stop_after_steps=2"])
    run_vlpt(["finetune", "--config", str(resumed)])
    for got, rel in ((losses(tmp_path / "two"), 1e-4), (losses(tmp_path / "resumed"), 1e-5)):
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=rel), step


def test_evaluate_writes_predictions_an_independent_scorer_agrees_with(tmp_path, pixel_data, ve_tasks, one_process):
    run_dir, _ = one_process
    cfg = ve_config(tmp_path, pixel_data, ve_tasks, "eval", None)
    out = tmp_path / "eval"
    run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(run_dir), "--out", str(out)])
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["pair_id", "label"]
    gold = {}
    with open(ve_tasks / "val" / "examples.jsonl") as f:
        for line in f:
            r = json.loads(line)
            gold[r["id"]] = ("contradiction", "entailment", "neutral")[r["label"]]
    predicted = dict(rows[1:])
    assert set(predicted) == set(gold)
    accuracy = sum(predicted[i] == gold[i] for i in gold) / len(gold)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["acc"] == pytest.approx(accuracy)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics["acc"] == pytest.approx(summary["val/ve_acc"])  # the run's last validation, same weights


def test_a_checkpoint_without_a_ve_head_is_refused_in_one_line(tmp_path, pixel_data, ve_tasks, albef_pretrained):
    cfg = ve_config(tmp_path, pixel_data, ve_tasks, "eval", None)
    proc = run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(albef_pretrained)], check=False)
    assert proc.returncode == 2 and "missing 4 [cls_head.0.weight" in proc.stderr and "run on ve" in proc.stderr


def test_export_of_the_run_has_albefs_ve_names(tmp_path, one_process):
    run_dir, _ = one_process
    dst = tmp_path / "ve.pth"
    run_vlpt(["convert", "export", "--src", str(run_dir), "--dst", str(dst)])
    out = torch.load(dst, weights_only=True)
    assert {k.split(".")[0] for k in out} == {"visual_encoder", "text_encoder", "cls_head", "visual_encoder_m",
                                              "text_encoder_m", "cls_head_m"}
