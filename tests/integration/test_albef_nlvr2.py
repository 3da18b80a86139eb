"""ALBEF NLVR2 through `vlpt finetune` / `vlpt evaluate` on the demo's NLVR2 task folders joined to the pixel
demo's pictures (the same scenes), from a tiny ALBEF pretraining run (fp32, no dropout), by ALBEF's route:

- text assignment (`tasks: {ta: 1}`) starts from the pretraining student with each fusion layer doubled and a
  new `ta_head`; its draws do not depend on the launch: 2 processes give 1 process's losses;
- NLVR2 starts from the text-assignment run (its `ta_head` and `vision_proj` dropped, the teacher a copy of
  the loaded student), or straight from pretraining (teacher loaded, fusion layers doubled);
- 2 processes at ZeRO-3 with every parameter partitioned (the shared key/value included) give the losses of
  1 process with the same global batch; a resumed run the uninterrupted one's;
- `vlpt evaluate` of either run's checkpoint writes predictions, and an independent scorer of them gets the
  same accuracy and consistency; export gives ALBEF's NLVR2 names.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from tests.conftest import read_metrics, run_vlpt, write_albef_retrieval_config, write_albef_task_config

pytestmark = pytest.mark.slow
STEPS = 4
PAIR_LAYERS = 2  # the tiny model's one fusion layer, doubled


@pytest.fixture(scope="module")
def nlvr2_tasks(pixel_tasks):
    return pixel_tasks / "nlvr2"


def ta_config(tmp_path, pixel_data, name, init_from):
    path = write_albef_retrieval_config(tmp_path, pixel_data, name, STEPS, init_from, task="ta")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val"] = None  # text assignment has no held-out metric
    path.write_text(yaml.safe_dump(raw))
    return path


def nlvr2_config(tmp_path, pixel_data, nlvr2_tasks, name, init_from, **sections):
    return write_albef_task_config(tmp_path, pixel_data, nlvr2_tasks.parent, "nlvr2", name, STEPS, init_from,
                                   **sections)


def losses(run_dir, task: str) -> dict:
    return {r["step"]: (r[f"{task}_loss"], r[f"{task}_acc"]) for r in read_metrics(run_dir) if f"{task}_loss" in r}


def assert_same_losses(got: dict, ref: dict, rel: float) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=rel), step


@pytest.fixture(scope="module")
def text_assignment(tmp_path_factory, pixel_data, albef_pretrained):
    tmp = tmp_path_factory.mktemp("albef_ta")
    proc = run_vlpt(["finetune", "--config", str(ta_config(tmp, pixel_data, "ta", albef_pretrained))])
    return tmp, proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data, nlvr2_tasks, text_assignment):
    tmp = tmp_path_factory.mktemp("albef_nlvr2_one")
    proc = run_vlpt(["finetune", "--config", str(nlvr2_config(tmp, pixel_data, nlvr2_tasks, "one",
                                                              text_assignment[0] / "ta"))])
    return tmp / "one", proc


def test_text_assignment_doubles_the_fusion_layers_and_is_launch_independent(tmp_path, pixel_data, albef_pretrained,
                                                                             text_assignment):
    tmp, proc = text_assignment
    assert "(fusion layers doubled where the source has one image); ta_head.*: new" in proc.stderr
    ref = losses(tmp / "ta", "ta")
    assert all(0.0 <= acc <= 1.0 for _, acc in ref.values())
    run_vlpt(["finetune", "--config", str(ta_config(tmp_path, pixel_data, "two", albef_pretrained))],
             launcher="torchrun", nproc=2)
    assert_same_losses(losses(tmp_path / "two", "ta"), ref, 1e-4)


def test_nlvr2_starts_from_the_text_assignment_run(one_process):
    run_dir, proc = one_process
    assert "cls_head.*: new; dropped: ta_head.*, vision_proj.*; teacher: a copy of the student" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["val/nlvr2_acc"] <= 1.0 and 0.0 <= summary["val/nlvr2_consistency"] <= 1.0
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    teacher = torch.load(ckpt / "teacher.pt", weights_only=True)
    assert f"model.text_encoder.fusion.{PAIR_LAYERS - 1}.crossattention.self.key.weight" in teacher


def test_nlvr2_straight_from_pretraining_loads_its_teacher(tmp_path, pixel_data, nlvr2_tasks, albef_pretrained):
    cfg = nlvr2_config(tmp_path, pixel_data, nlvr2_tasks, "direct", albef_pretrained, train={"max_steps": 1})
    proc = run_vlpt(["finetune", "--config", str(cfg)])
    assert "teacher: loaded, its cls_head a copy of the student's" in proc.stderr


def test_two_processes_at_zero3_match_one_and_resume_is_exact(tmp_path, pixel_data, nlvr2_tasks, text_assignment,
                                                                one_process):
    ta = text_assignment[0] / "ta"
    ref = losses(one_process[0], "nlvr2")
    zero3 = {"zero_stage": 3, "zero3_persistence_threshold": 0}
    two = nlvr2_config(tmp_path, pixel_data, nlvr2_tasks, "two", ta, parallel=zero3)
    run_vlpt(["finetune", "--config", str(two)], launcher="torchrun", nproc=2)
    resumed = nlvr2_config(tmp_path, pixel_data, nlvr2_tasks, "resumed", ta, train={"save_every": 2})
    run_vlpt(["finetune", "--config", str(resumed), "--train.stop_after_steps=2"])
    run_vlpt(["finetune", "--config", str(resumed)])
    assert_same_losses(losses(tmp_path / "two", "nlvr2"), ref, 1e-4)
    assert_same_losses(losses(tmp_path / "resumed", "nlvr2"), ref, 1e-5)
    # the ZeRO-3 checkpoint (its shared key/value stored under one name) is read back by vlpt evaluate
    out = evaluate(tmp_path, pixel_data, nlvr2_tasks, tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert out["metrics"]["acc"] == pytest.approx(summary["val/nlvr2_acc"])


def evaluate(tmp_path, pixel_data, nlvr2_tasks, checkpoint) -> dict:
    cfg = nlvr2_config(tmp_path, pixel_data, nlvr2_tasks, "eval", None)
    out = tmp_path / f"eval-{checkpoint.name}"
    run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(checkpoint), "--out", str(out)])
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"rows": rows, **metrics}


def test_evaluate_writes_predictions_an_independent_scorer_agrees_with(tmp_path, pixel_data, nlvr2_tasks,
                                                                      one_process):
    run_dir, _ = one_process
    out = evaluate(tmp_path, pixel_data, nlvr2_tasks, run_dir)
    rows = out["rows"]  # `identifier,True|False`, no header (NLVR2's own scorer reads every line)
    gold = {}
    with open(nlvr2_tasks / "val" / "examples.jsonl") as f:
        for line in f:
            r = json.loads(line)
            gold[r["id"]] = int(r["label"])
    assert {row[1] for row in rows} <= {"True", "False"}
    predicted = {row[0]: int(row[1] == "True") for row in rows}
    assert set(predicted) == set(gold)
    accuracy = sum(predicted[i] == gold[i] for i in gold) / len(gold)
    sentences: dict[str, bool] = {}
    for i in gold:  # ids <split>-<sentence>-<pair>: a sentence is consistent when all its pairs are right
        key = i.rsplit("-", 1)[0]
        sentences[key] = sentences.get(key, True) and predicted[i] == gold[i]
    assert out["metrics"]["acc"] == pytest.approx(accuracy)
    assert out["metrics"]["consistency"] == pytest.approx(sum(sentences.values()) / len(sentences))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["metrics"]["acc"] == pytest.approx(summary["val/nlvr2_acc"])


def test_export_of_the_run_has_albefs_nlvr2_names(tmp_path, one_process):
    run_dir, _ = one_process
    dst = tmp_path / "nlvr2.pth"
    run_vlpt(["convert", "export", "--src", str(run_dir), "--dst", str(dst)])
    out = torch.load(dst, weights_only=True)
    assert {k.split(".")[0] for k in out} == {"visual_encoder", "text_encoder", "cls_head", "visual_encoder_m",
                                              "text_encoder_m", "cls_head_m"}
    layers = {int(k.split(".")[3]) for k in out if k.startswith("text_encoder.encoder.layer.")}
    assert layers == set(range(1 + PAIR_LAYERS))  # 1 text layer, then the pair of fusion layers
    key = "text_encoder.encoder.layer.{}.crossattention.self.key.weight"
    assert torch.equal(out[key.format(1)], out[key.format(2)])  # the pair's shared key, under both names
