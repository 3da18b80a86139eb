"""The end-of-run summary: the MLflow run only when tracking is on, aligned columns, chance levels."""
from __future__ import annotations

import json

from trainer.summary import print_summary

BASE = {"steps": 4, "steps_this_run": 4, "seconds": 2.0, "samples_per_s": 8.0, "task_counts": {"mlm": 4},
        "checkpoint": "/runs/x/checkpoints/step_00000004"}


def test_tracking_on_prints_the_run_and_how_to_open_it(tmp_path, capsys):
    ui = f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    print_summary({**BASE, "mlflow_run_id": "abc123", "mlflow_ui": ui}, str(tmp_path))
    out = capsys.readouterr().out
    assert "MLflow run        abc123" in out and f"open it with      {ui}" in out


def test_tracking_off_says_so_instead_of_a_run_that_does_not_exist(tmp_path, capsys):
    print_summary({**BASE, "mlflow_run_id": None, "mlflow_ui": None}, str(tmp_path))
    out = capsys.readouterr().out
    assert "MLflow            off (tracking.enabled: false)" in out
    assert "None" not in out and "mlflow ui" not in out


def test_held_out_columns_are_aligned_by_the_longest_key(tmp_path, capsys):
    records = [{"step": 5, "val/mrfr_mse_per_region": 1206.7759, "val/mlm_acc": 0.5},
               {"step": 9, "val/mrfr_mse_per_region": 980.25, "val/mlm_acc": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print_summary({**BASE, "mlflow_run_id": None, "mlflow_ui": None}, str(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  val/")]
    assert lines[1] == "  val/mrfr_mse_per_region  1206.7759 -> 980.2500"  # a space before the value
    assert lines[0].startswith("  val/mlm_acc ") and lines[0].endswith("0.5000 -> 0.7500")
    assert lines[0].index(" -> ") == lines[1].index(" -> ")  # right-aligned values


def test_retrieval_prints_the_chance_level_of_both_directions(tmp_path, capsys):
    recalls = {f"val/albef_{d}_r{at}": 10.0 * at for d in ("t2i", "i2t") for at in (1, 5, 10)}
    print_summary({**BASE, "mlflow_run_id": None, "mlflow_ui": None, **recalls,
                   "val/albef_t2i_r1_chance": 10.0, "val/albef_i2t_r1_chance": 12.5}, str(tmp_path))
    out = capsys.readouterr().out
    assert "R@1 by chance  text->image 10.00%  image->text 12.50%" in out
