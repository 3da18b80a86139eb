"""`vlpt bench train`: the plain-way baseline trains the very model ours does (same weights,
same losses and gradients), and the command prints and records ours/baseline ratios on CPU."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import run_vlpt, write_tiny_config
from tests.engine_util import demo_region_samples, tiny_uniter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(demo_data, tok):
    from data.collate import collate_itm, collate_mlm, collate_mrm

    samples = demo_region_samples(demo_data, tok, 8)
    rng = np.random.default_rng(3)
    return {"mlm": collate_mlm(samples, rng, tok), "itm": collate_itm(samples, rng, tok, neg_prob=0.5),
            "mrfr": collate_mrm(samples, rng, tok, mrm_prob=0.3, task="mrfr")}


@pytest.mark.parametrize("task", ["mlm", "itm", "mrfr"])
def test_baseline_is_the_same_model(batches, tok, task):
    from trainer.bench_train import baseline_model, plain_ops
    from trainer.objectives.itm import WraConfig
    from trainer.recipes.uniter_tasks import task_functions

    fn = task_functions(WraConfig())[task]
    ours = tiny_uniter(tok)
    plain = baseline_model(copy.deepcopy(ours))
    assert type(plain.uniter.encoder).__name__ == "HuggingFaceEncoder"
    got = ours(batches[task], fn).losses["loss"]
    got.backward()
    with plain_ops():
        want = plain(batches[task], fn).losses["loss"]
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain_params = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_boolean_mask_gather_matches_positions():
    from trainer.bench_train import boolean_mask_gather

    hidden = torch.randn(3, 5, 4)
    index = torch.tensor([1, 4, 7, 14])
    torch.testing.assert_close(boolean_mask_gather(hidden, index), hidden.reshape(15, 4)[index])


@pytest.mark.slow
def test_bench_train_cli_prints_and_records_ratios(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "b.yaml", demo_data, tmp_path / "run", tasks={"mlm": 1, "itm": 1, "mrfr": 1})
    out = tmp_path / "train.json"
    proc = run_vlpt(["bench", "train", "--config", str(cfg), "--steps", "4", "--warmup", "1",
                     "--batches-per-task", "2", "--profile-steps", "2", "--out", str(out)])
    assert "ours/baseline: steps/s" in proc.stdout
    assert "ours: top ops by host time over 2 profiled steps" in proc.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "train" and record["timed_steps"] == 4 and record["world_size"] == 1
    for side in ("ours", "baseline"):
        r = record[side]
        assert r["steps"] == 4 and r["seconds"] > 0 and "mfu" not in r  # no MFU without a GPU
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 8, rel=1e-9)
        assert r["tokens_per_s"] > r["samples_per_s"]
        # profiled after timing, so the timed figures are the same with or without it
        assert r["profile"]["steps"] == 2 and "by_self_cuda" not in r["profile"]
        assert any("Self CPU" in line for line in r["profile"]["by_self_cpu"][:4])
        assert any("aten::mm" in line or "aten::addmm" in line for line in r["profile"]["by_self_cpu"])
    q = record["ours_over_baseline"]
    assert q["samples_per_s"] == pytest.approx(record["ours"]["samples_per_s"] / record["baseline"]["samples_per_s"])
