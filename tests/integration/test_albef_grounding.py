"""ALBEF grounding through `vlpt finetune` / `vlpt evaluate` on the demo's RE task folders (with their candidate
boxes) joined to the pixel demo's pictures, from a tiny ALBEF pretraining run (fp32, no dropout):

- training is retrieval fine-tuning on (expression, picture) pairs: 2 processes at ZeRO-3 with every parameter
  partitioned give the losses of 1 process with the same global batch, and the run validates grounding
  accuracy (its Grad-CAM taken through the partitioned engine) with the chance level of its candidates;
- `vlpt evaluate` writes RE's predictions file, and an independent scorer of its boxes gets the same accuracy.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_vlpt, write_albef_task_config

pytestmark = pytest.mark.slow
STEPS = 4
LOSSES = ("grounding_itc", "grounding_itm")


def config(tmp_path, pixel_data, pixel_tasks, name, init_from, **sections):
    return write_albef_task_config(tmp_path, pixel_data, pixel_tasks, "grounding", name, STEPS, init_from,
                                   folder="re", finetune={"gradcam_layer": 0}, **sections)


def losses(run_dir) -> dict:
    return {r["step"]: [r[k] for k in LOSSES] for r in read_metrics(run_dir) if LOSSES[0] in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data, pixel_tasks, albef_pretrained):
    tmp = tmp_path_factory.mktemp("albef_grounding_one")
    run_vlpt(["finetune", "--config", str(config(tmp, pixel_data, pixel_tasks, "one", albef_pretrained))])
    return tmp / "one"


def test_two_processes_at_zero3_match_one_and_both_validate(tmp_path, pixel_data, pixel_tasks, albef_pretrained,
                                                            one_process):
    zero3 = {"zero_stage": 3, "zero3_persistence_threshold": 0}
    run_vlpt(["finetune", "--config", str(config(tmp_path, pixel_data, pixel_tasks, "two", albef_pretrained,
                                                 parallel=zero3))], launcher="torchrun", nproc=2)
    ref, got = losses(one_process), losses(tmp_path / "two")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    one = json.loads((one_process / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert 0.0 < one["val/grounding_acc_chance"] < 1.0 and 0.0 <= one["val/grounding_acc"] <= 1.0
    assert two["val/grounding_acc"] == pytest.approx(one["val/grounding_acc"], abs=0.05)


def iou(a, b) -> float:
    """RefCOCO's inclusive-pixel IoU of [x, y, w, h] boxes, written out again here."""
    ix = min(a[0] + a[2] - 1, b[0] + b[2] - 1) - max(a[0], b[0]) + 1
    iy = min(a[1] + a[3] - 1, b[1] + b[3] - 1) - max(a[1], b[1]) + 1
    inter = ix * iy if ix > 0 and iy > 0 else 0.0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_evaluate_writes_re_predictions_an_independent_scorer_agrees_with(tmp_path, pixel_data, pixel_tasks,
                                                                         one_process):
    out = tmp_path / "eval"
    cfg = config(tmp_path, pixel_data, pixel_tasks, "eval", None)
    run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(one_process), "--out", str(out)])
    rows = json.loads((out / "predictions.json").read_text())
    gold = {}
    with open(pixel_tasks / "re" / "val" / "examples.jsonl") as f:
        for line in f:
            r = json.loads(line)
            gold[r["id"]] = r
    assert {r["id"] for r in rows} == set(gold)
    assert all(r["box"] in gold[r["id"]]["boxes"] for r in rows)  # always one of the candidates
    accuracy = sum(iou(r["box"], gold[r["id"]]["box"]) >= 0.5 for r in rows) / len(rows)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["acc"] == pytest.approx(accuracy)
    summary = json.loads((one_process / "summary.json").read_text())
    assert metrics["acc"] == pytest.approx(summary["val/grounding_acc"])
