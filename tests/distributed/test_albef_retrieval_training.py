"""ALBEF retrieval fine-tuning through `vlpt finetune` from a tiny pretraining run (fp32, no dropout):

- 2 processes (torchrun, ZeRO-0 and ZeRO-3 with every parameter partitioned) give the losses of 1
  process with the same global batch (micro 8 x accumulation 2) over 5 steps, and the same teacher: momentum weights, queues and the image-index
  queue, which both fill from the all-gathered global batch;
- a run stopped after step 3 and resumed gives the uninterrupted run's losses and teacher.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_vlpt, write_albef_config, write_albef_retrieval_config

pytestmark = pytest.mark.slow
STEPS = 5
LOSSES = ("retrieval_itc", "retrieval_itm", "retrieval_loss", "retrieval_temp")


def losses(run_dir) -> dict:
    return {r["step"]: {k: r[k] for k in LOSSES} for r in read_metrics(run_dir) if "retrieval_itc" in r}


def teacher_state(run_dir) -> dict:
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(ckpt / "teacher.pt", weights_only=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pixel_data):
    tmp = tmp_path_factory.mktemp("albef_pre")
    run_vlpt(["pretrain", "--config", str(write_albef_config(tmp, pixel_data, "pre", 4))])
    return tmp / "pre"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data, pretrained):
    tmp = tmp_path_factory.mktemp("albef_ft_one")
    run_vlpt(["finetune", "--config", str(write_albef_retrieval_config(tmp, pixel_data, "one", STEPS, pretrained))])
    s = json.loads((tmp / "one" / "summary.json").read_text())
    assert (s["world_size"], s["grad_accum"], s["global_batch_size"]) == (1, 2, 16)
    return tmp / "one"


def assert_same_run(ref_dir, got_dir, rtol=1e-4):
    ref, got = losses(ref_dir), losses(got_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        for name in LOSSES:
            assert got[step][name] == pytest.approx(ref[step][name], rel=rtol), (step, name)
    ref_teacher, teacher = teacher_state(ref_dir), teacher_state(got_dir)
    assert ref_teacher.keys() == teacher.keys()
    assert torch.equal(teacher["queues.idx_queue"], ref_teacher["queues.idx_queue"])
    for key in ref_teacher:
        torch.testing.assert_close(teacher[key], ref_teacher[key], rtol=rtol, atol=1e-5)


def test_fine_tuning_starts_from_the_pretraining_teacher_and_fills_the_index_queue(one_process, pretrained):
    pre = teacher_state(pretrained)
    ft = teacher_state(one_process)
    assert "queues.idx_queue" not in pre and "text_encoder.cls.predictions.bias" in pre
    assert "text_encoder.cls.predictions.bias" not in ft
    # 5 steps of 16 pairs into 48 slots: every slot filled, each with one of the 48 training scenes' hash
    assert int(ft["queues.ptr"]) == (int(pre["queues.ptr"]) + STEPS * 16) % 48
    assert (ft["queues.idx_queue"] >= 0).all()
    ref = losses(one_process)
    assert ref[1]["retrieval_temp"] != ref[STEPS]["retrieval_temp"]  # learnt (no clamp)


@pytest.mark.parametrize("zero", [{"zero_stage": 0}, {"zero_stage": 3, "zero3_persistence_threshold": 0}],
                         ids=["zero0", "zero3-all-partitioned"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, pixel_data, pretrained, one_process, zero):
    cfg = write_albef_retrieval_config(tmp_path, pixel_data, "two", STEPS, pretrained, parallel=zero)
    run_vlpt(["finetune", "--config", str(cfg)], launcher="torchrun", nproc=2)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (s["world_size"], s["grad_accum"], s["global_batch_size"]) == (2, 1, 16)
    assert_same_run(one_process, tmp_path / "two")


def test_resume_reproduces_the_uninterrupted_run(tmp_path, pixel_data, pretrained, one_process):
    cfg = write_albef_retrieval_config(tmp_path, pixel_data, "resumed", STEPS, pretrained, train={"save_every": 3})
    run_vlpt(["finetune", "--config", str(cfg), "--train.stop_after_steps=3"])
    run_vlpt(["finetune", "--config", str(cfg)])
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["steps_this_run"] == STEPS - 3
    assert_same_run(one_process, tmp_path / "resumed", rtol=1e-5)


def test_export_of_the_fine_tuned_run_has_albefs_retrieval_names(tmp_path, one_process):
    """`vlpt convert export` checks the run against its config (a model without MLM head) and writes the
    key names of ALBEF's retrieval model, queues and image-index queue included."""
    dst = tmp_path / "retrieval.pth"
    proc = run_vlpt(["convert", "export", "--src", str(one_process), "--dst", str(dst)])
    assert "student and momentum model" in proc.stdout
    out = torch.load(dst, weights_only=True)
    assert out["idx_queue"].shape == (1, 48) and (out["idx_queue"] >= 0).all()
    assert "text_encoder.embeddings.word_embeddings.weight" in out and "text_encoder_m.encoder.layer.1.output.dense.weight" in out
    assert not any(".bert." in k or k.startswith(("text_encoder.cls.", "text_encoder_m.cls.")) for k in out)


@pytest.mark.parametrize("source, message", [
    ("missing", "finetune.init_from: file not found"),
    ("uniter.pt", "finetune.init_from=.*not an ALBEF model's state dict"),
])
def test_a_bad_init_source_is_one_line(tmp_path, pixel_data, source, message):
    import re

    path = tmp_path / source
    if source.endswith(".pt"):
        torch.save({"uniter.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, path)
    cfg = write_albef_retrieval_config(tmp_path, pixel_data, "bad", 1, path)
    proc = run_vlpt(["finetune", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


def recalls_from_files(out) -> dict:
    """An independent scorer of the files: per query, the rank of its best true match in its score row (a
    true match left at ALBEF's -100, i.e. outside the ITM top k, ranks last), then R@1/5/10 in percent."""
    import numpy as np

    ids = json.loads((out / "ids.json").read_text())
    t2i, i2t = np.load(out / "scores.npy"), np.load(out / "scores_i2t.npy")
    assert t2i.dtype == np.float32 and t2i.shape == (len(ids["texts"]), len(ids["images"])) == i2t.T.shape
    image_of_text = [t.rsplit("-", 1)[0] for t in ids["texts"]]  # demo caption keys: <image_id>-<caption>
    truth = np.array([[img == image for image in ids["images"]] for img in image_of_text])  # [T, I]

    def ranks(scores, true):
        out = []
        for row, is_true in zip(scores, true):
            best = row[is_true].max()
            out.append(int((row > best).sum()) if best > -100 else len(row) - 1)
        return np.array(out)

    found = {}
    for prefix, r in (("t2i", ranks(t2i, truth)), ("i2t", ranks(i2t, truth.T))):
        found.update({f"{prefix}_r{k}": 100.0 * float((r < k).mean()) for k in (1, 5, 10)})
    return found


@pytest.mark.parametrize("which", ["fine-tuned", "zero-shot"])
def test_evaluate_writes_score_matrices_an_independent_scorer_agrees_with(tmp_path, pixel_data, pretrained,
                                                                          one_process, which):
    cfg = write_albef_retrieval_config(tmp_path, pixel_data, "eval", STEPS, pretrained)
    checkpoint = one_process if which == "fine-tuned" else pretrained
    out = tmp_path / "eval-out"
    run_vlpt(["evaluate", "--config", str(cfg), "--checkpoint", str(checkpoint), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert recalls_from_files(out) == pytest.approx({k: metrics[k] for k in recalls_from_files(out)}, abs=1e-4)
    if which == "fine-tuned":  # the run's own final validation scored the same weights on the same split
        summary = json.loads((one_process / "summary.json").read_text())
        assert metrics["r_mean"] == pytest.approx(summary["val/retrieval_r_mean"])


def test_demo_finetune_table_of_the_albef_family(tmp_path, pixel_data, pretrained):
    """`vlpt demo-finetune --family albef` runs the pretrained and the from-scratch fine-tuning of its configs
    folder and tabulates text->image R@1 with its chance level (2 steps each here)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    cfg = write_albef_retrieval_config(tmp_path, pixel_data, "unused", 2, pretrained)
    (configs / "demo-albef-retrieval.yaml").write_text(cfg.read_text())
    out = tmp_path / "table"
    proc = run_vlpt(["demo-finetune", "--family", "albef", "--tasks", "retrieval", "--configs", str(configs),
                     "--out", str(out)])
    assert "| task | metric | from `make demo-albef` | from scratch | chance |" in proc.stdout
    (row,) = json.loads((out / "table.json").read_text())
    assert (row["task"], row["metric"], row["chance"]) == ("retrieval", "t2i_r1", 10.0)  # 10 val images
    assert row["pretrained"] == row["all_pretrained"]["retrieval_t2i_r1"] and row["scratch"] is not None
    assert row["all_pretrained"] != row["all_scratch"]
    bad = run_vlpt(["demo-finetune", "--family", "albef", "--tasks", "vcr", "--out", str(out)], check=False)
    assert bad.returncode == 2 and "vcr is not among the albef demo tasks" in bad.stderr
