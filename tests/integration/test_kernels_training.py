"""Acceptance: a tiny training run gives the same losses on the torch references
(VLPT_KERNELS=off) and on the fused kernels (Triton's interpreter on CPU, VLPT_KERNELS=on)."""
import json

import pytest

from tests.conftest import read_metrics, run_vlpt, step_losses, write_tiny_config

pytestmark = pytest.mark.slow

TASKS = {"mlm": 1, "itm": 1, "mrfr": 1, "mrc-kl": 1}  # masked gather (MLM, MRM) and IPOT (ITM)


def validation_metrics(run_dir) -> dict[tuple[int, str], float]:
    return {(rec["step"], k): v for rec in read_metrics(run_dir) for k, v in rec.items()
            if k.startswith("val/")}


def test_kernels_and_references_give_the_same_losses(tmp_path, demo_data):
    runs = {}
    for name, env in (("off", {"VLPT_KERNELS": "off"}),
                      ("on", {"VLPT_KERNELS": "on", "TRITON_INTERPRET": "1"})):
        run_dir = tmp_path / name
        cfg = write_tiny_config(tmp_path / f"{name}.yaml", demo_data, run_dir, tasks=TASKS,
                                train={"max_steps": 12, "val_every": 6})
        run_vlpt(["pretrain", "--config", str(cfg)], env=env)
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[name] = step_losses(run_dir), validation_metrics(run_dir), summary["task_counts"]
    (ref, ref_val, ref_tasks), (got, got_val, got_tasks) = runs["off"], runs["on"]
    assert set(ref_tasks) == set(TASKS) and got_tasks == ref_tasks  # every kernel was on the path
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=0), step
    assert {k for _, k in ref_val} >= {"val/itm_ot_pos", "val/itm_ot_neg", "val/mlm_loss",
                                       "val/mrfr_loss", "val/mrc-kl_loss"}, sorted(ref_val)
    assert got_val.keys() == ref_val.keys()
    for key, value in ref_val.items():
        assert got_val[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
