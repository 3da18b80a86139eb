"""Acceptance: a planted secret in the environment of a real run started by `vlpt launch local
--submit` (torchrun, 2 CPU processes, MLflow on) appears in no MLflow param, no log line and no
file of the run; the run's per-rank logs are where the launch put them."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, subprocess_env, write_tiny_config

pytestmark = pytest.mark.slow

SECRET = "PLANTED-mlflow-91c4-SECRET"
PLANTED_ENV = {"AWS_ACCESS_KEY_ID": "AKIA" + SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_SESSION_TOKEN": "tok-" + SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET}


def test_planted_secret_reaches_no_mlflow_param_log_or_file(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run-{now}", tracking={"enabled": True},
                            optim={"global_batch_size": 16})
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text("nodes: 1\ngpus_per_node: 0\nnproc_per_node: 2\nmax_restarts: 0\n")
    proc = subprocess.run([sys.executable, "-m", "vlpt", "launch", "local", "--config", str(cfg),
                           "--cluster", str(cluster_yaml), "--master-port", str(free_port()), "--submit"],
                          cwd=REPO, env={**subprocess_env(), **PLANTED_ENV}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert SECRET not in proc.stdout + proc.stderr
    run_dir = next(tmp_path.glob("run-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert len(run.data.params) > 50 and run.data.params["train.run_dir"] == str(run_dir)
    assert not [k for k, v in run.data.params.items() if SECRET in v or SECRET in k]
    assert not [k for k in run.data.tags if SECRET in run.data.tags[k]]
    files = [p for p in run_dir.rglob("*") if p.is_file()]  # mlflow.db, artifacts, logs, checkpoints
    assert any(p.name == "mlflow.db" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    rank_logs = sorted(p.parent.name for p in (run_dir / "logs" / "local").glob("*/attempt_0/*/stdout.log"))
    assert rank_logs == ["0", "1"]
