"""The end-of-run summary names the MLflow run only when tracking is on."""
from __future__ import annotations

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
