"""ALBEF through `vlpt pretrain` on tiny picture shards (fp32, no dropout):

- 2 processes (torchrun, the queue filled by an all-gather) give the ITC loss sequence, and
  every other loss, of 1 process with the same global batch (micro 8 x accumulation 2), at
  ZeRO-0 and at ZeRO-3 with every parameter partitioned (the EMA gathers them);
- a run stopped after step 5 and resumed gives the uninterrupted run's losses, and its final
  checkpoint holds the same teacher (momentum weights and queues);
- the held-out retrieval metrics of 2 ranks equal those of 1.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_vlpt, write_albef_config

pytestmark = pytest.mark.slow
STEPS = 10
LOSSES = ("albef_itc", "albef_itm", "albef_mlm", "albef_loss")


def losses(run_dir):
    """{step: {loss name: value}}, last record per step."""
    out = {}
    for rec in read_metrics(run_dir):
        if "albef_itc" in rec:
            out[rec["step"]] = {k: rec[k] for k in LOSSES}
    return out


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def teacher_state(run_dir):
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(ckpt / "teacher.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pixel_data):
    tmp = tmp_path_factory.mktemp("albef_one")
    run_vlpt(["pretrain", "--config", str(write_albef_config(tmp, pixel_data, "one", STEPS))])
    s = summary(tmp / "one")
    assert (s["world_size"], s["grad_accum"], s["global_batch_size"]) == (1, 2, 16)
    return tmp / "one"


def assert_same_losses(ref, got):
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        for name in LOSSES:
            assert got[step][name] == pytest.approx(ref[step][name], rel=1e-4), (step, name)


@pytest.mark.parametrize("zero", [{"zero_stage": 0}, {"zero_stage": 3, "zero3_persistence_threshold": 0}],
                         ids=["zero0", "zero3-all-partitioned"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, pixel_data, one_process, zero):
    cfg = write_albef_config(tmp_path, pixel_data, "two", STEPS, parallel=zero)
    run_vlpt(["pretrain", "--config", str(cfg)], launcher="torchrun", nproc=2)
    s = summary(tmp_path / "two")
    assert (s["world_size"], s["grad_accum"], s["global_batch_size"]) == (2, 1, 16)
    ref = losses(one_process)
    assert ref[STEPS]["albef_itc"] < ref[1]["albef_itc"]  # it learns, so the sequences say something
    assert_same_losses(ref, losses(tmp_path / "two"))
    ref_teacher, teacher = teacher_state(one_process), teacher_state(tmp_path / "two")
    for key in ref_teacher:
        torch.testing.assert_close(teacher[key], ref_teacher[key], rtol=1e-4, atol=1e-5)
    retrieval = {k: v for k, v in summary(one_process).items() if "_r" in k and k.startswith("val/")}
    assert retrieval and {k: s[k] for k in retrieval} == pytest.approx(retrieval)


def test_resume_reproduces_the_uninterrupted_run_with_teacher_and_queues(tmp_path, pixel_data, one_process):
    cfg = write_albef_config(tmp_path, pixel_data, "resumed", STEPS, train={"save_every": 5})
    run_vlpt(["pretrain", "--config", str(cfg), "--train.stop_after_steps=5"])
    saved = teacher_state(tmp_path / "resumed")
    assert int(saved["queues.ptr"]) == 5 * 16 % 48
    run_vlpt(["pretrain", "--config", str(cfg)])
    assert summary(tmp_path / "resumed")["steps_this_run"] == STEPS - 5
    assert_same_losses(losses(one_process), losses(tmp_path / "resumed"))
    ref_teacher, teacher = teacher_state(one_process), teacher_state(tmp_path / "resumed")
    assert ref_teacher.keys() == teacher.keys()
    for key in ref_teacher:
        torch.testing.assert_close(teacher[key], ref_teacher[key], rtol=1e-5, atol=1e-6)
