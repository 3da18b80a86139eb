"""ALBEF VQA through `vlpt finetune` / `vlpt evaluate` on the demo's VQA task folders joined to the pixel demo's
pictures (the same scenes), from a tiny ALBEF pretraining run (fp32, no dropout):

- the answer decoder starts from the pretraining student's fusion layers and MLM head (no new head), the
  teacher from its momentum model alike;
- 2 processes at ZeRO-3 with every parameter partitioned (the decoder's tied MLM head included) give the
  losses of 1 process with the same global batch; a resumed run the uninterrupted one's;
- `vlpt evaluate` writes VQA's results file, and an independent scorer of it gets the same VQA score;
  export gives ALBEF's `model_vqa` names.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_vlpt, write_albef_task_config

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def vqa_tasks(pixel_tasks):
    return pixel_tasks / "vqa"


def vqa_config(tmp_path, pixel_data, vqa_tasks, name, init_from, **sections):
    return write_albef_task_config(tmp_path, pixel_data, vqa_tasks.parent, "vqa", name, STEPS, init_from, **sections)


def losses(run_dir) -> dict:
    return {r["step"]: r["vqa_loss"] for r in read_metrics(run_dir) if "vqa_loss" in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data, vqa_tasks, albef_pretrained):
    tmp = tmp_path_factory.mktemp("albef_vqa_one")
    proc = run_vlpt(["finetune", "--config", str(vqa_config(tmp, pixel_data, vqa_tasks, "one", albef_pretrained))])
    return tmp / "one", proc


def test_the_decoder_and_its_teacher_start_from_the_pretraining_run(one_process, albef_pretrained):
    run_dir, proc = one_process
    assert "no new head; dropped: itm_head.*, temp, text_proj.*, vision_proj.*; teacher: loaded" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["val/vqa_score"] <= 1.0 and sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    teacher = torch.load(ckpt / "teacher.pt", weights_only=True)
    pre_ckpt = albef_pretrained / "checkpoints" / (albef_pretrained / "checkpoints" / "latest").read_text().strip()
    pre_teacher = torch.load(pre_ckpt / "teacher.pt", weights_only=True)
    key = "fusion.0.crossattention.self.query.weight"  # the decoder's layer 0 from the teacher's fusion layer 0
    assert (teacher["model.text_decoder." + key] - pre_teacher["text_encoder." + key]).abs().max() < 0.1


def test_two_processes_at_zero3_match_one_and_resume_is_exact(tmp_path, pixel_data, vqa_tasks, albef_pretrained,
                                                                one_process):
    ref = losses(one_process[0])
    zero3 = {"zero_stage": 3, "zero3_persistence_threshold": 0}
    run_vlpt(["finetune", "--config", str(vqa_config(tmp_path, pixel_data, vqa_tasks, "two", albef_pretrained,
                                                     parallel=zero3))], launcher="torchrun", nproc=2)
    resumed = vqa_config(tmp_path, pixel_data, vqa_tasks, "resumed", albef_pretrained, train={"save_every": 2})
    run_vlpt(["finetune", "--config", str(resumed), "--train.stop_after_steps=2"])
    run_vlpt(["finetune", "--config", str(resumed)])
    for got, rel in ((losses(tmp_path / "two"), 1e-4), (losses(tmp_path / "resumed"), 1e-5)):
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=rel), step


def test_evaluate_writes_vqa_results_an_independent_scorer_agrees_with(tmp_path, pixel_data, vqa_tasks,
                                                                      one_process):
    run_dir, _ = one_process
    out = tmp_path / "eval"
    cfg = vqa_config(tmp_path, pixel_data, vqa_tasks, "eval", None)
    run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(run_dir), "--out", str(out)])
    results = json.loads((out / "predictions.json").read_text())
    vocab = json.loads((vqa_tasks / "val" / "manifest.json").read_text())["labels"]
    gold = {}
    with open(vqa_tasks / "val" / "examples.jsonl") as f:
        for line in f:
            r = json.loads(line)
            gold[r["id"]] = {vocab[a]: s for a, s in zip(r["labels"], r["scores"])}
    assert {r["question_id"] for r in results} == set(gold) and all(r["answer"] in vocab for r in results)
    score = sum(gold[r["question_id"]].get(r["answer"], 0.0) for r in results) / len(results)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["score"] == pytest.approx(score)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics["score"] == pytest.approx(summary["val/vqa_score"])


def test_export_of_the_run_has_albefs_vqa_names(tmp_path, one_process):
    run_dir, _ = one_process
    dst = tmp_path / "vqa.pth"
    run_vlpt(["convert", "export", "--src", str(run_dir), "--dst", str(dst)])
    out = torch.load(dst, weights_only=True)
    assert {k.split(".")[0] for k in out} == {"visual_encoder", "text_encoder", "text_decoder", "visual_encoder_m",
                                              "text_encoder_m", "text_decoder_m"}
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.value.weight" in out
