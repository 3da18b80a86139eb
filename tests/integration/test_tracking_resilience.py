"""Acceptance: an unreachable MLflow server never stops training (warn, buffer, retry); against a
real `mlflow server` on loopback the run's params, metrics and artifacts read back through MlflowClient."""
import json
import logging
import time

import pytest

from tests.conftest import free_port, run_vlpt, write_tiny_config
from tests.mlflow_server import MlflowServer
from trainer.config import TrackingConfig
from trainer.tracking import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def start(port=None):
        started.append(MlflowServer(tmp_path / f"server{len(started)}", port or free_port()))
        return started[-1]
    yield start
    for s in started:
        s.stop()


def test_tracker_buffers_while_down_and_sends_once_the_server_is_up(tmp_path, server_factory, caplog):
    port = free_port()  # nothing listens here yet
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{port}", retry_interval_s=0.0, request_timeout_s=5)
    caplog.set_level(logging.WARNING, logger="trainer.tracking")
    tracker = Tracker(cfg, str(tmp_path), enabled=True)
    tracker.log_params({"model.hidden_size": 32})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step, task="mlm")
    assert tracker.run_id is None and tracker.failures >= 4
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # one warning per outage, not per call

    server = server_factory(port)
    for step in range(4, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step, task="mlm")
    assert tracker.run_id is not None
    tracker.finish()
    assert any("reachable again" in r.getMessage() for r in caplog.records)

    from mlflow.tracking import MlflowClient
    run = MlflowClient(server.url).get_run(tracker.run_id)
    assert run.data.params["model.hidden_size"] == "32" and run.info.status == "FINISHED"
    history = MlflowClient(server.url).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_tracker_retries_no_sooner_than_the_interval(tmp_path):
    now = [0.0]
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", retry_interval_s=30, retry_max_interval_s=60)
    tracker = Tracker(cfg, str(tmp_path), enabled=True, clock=lambda: now[0])
    assert tracker.failures == 1
    for step in range(1, 50):  # a dead server costs nothing per step inside the interval
        tracker.log_metrics({"loss": 1.0}, step)
    assert tracker.failures == 1
    now[0] = 31.0
    tracker.log_metrics({"loss": 1.0}, 50)
    assert tracker.failures == 2  # retried once; the next wait doubled to the 60 s cap
    now[0] = 31.0 + 59
    tracker.log_metrics({"loss": 1.0}, 51)
    assert tracker.failures == 2
    tracker.finish()  # one last try
    assert tracker.failures == 3


def test_tracker_drops_oldest_metrics_beyond_the_buffer(tmp_path):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", retry_interval_s=3600, retry_max_interval_s=3600,
                         max_buffered=10)
    tracker = Tracker(cfg, str(tmp_path), enabled=True)
    for step in range(1, 9):
        tracker.log_metrics({"a": 1.0, "b": 2.0}, step)  # 16 values
    assert tracker.dropped == 3 and tracker._queued_metrics == 10


def test_pretrain_with_closed_tracking_port_finishes_and_warns(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir,
                            tracking={"enabled": True, "uri": uri, "retry_interval_s": 1})
    t0 = time.monotonic()
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert time.monotonic() - t0 < 300
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    out = proc.stdout + proc.stderr
    assert f"MLflow at {uri} unreachable" in out and "vlpt pretrain: done" in out
    assert "records could not be sent" in out


def test_pretrain_against_a_real_mlflow_server(tmp_path, demo_data, server_factory):
    server = server_factory()
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir,
                            tracking={"enabled": True, "uri": server.url, "experiment": "loopback"})
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "unreachable" not in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())

    from mlflow.tracking import MlflowClient
    client = MlflowClient(server.url)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "32" and run.data.params["run.world_size"] == "1"
    assert "val/itm_acc" in run.data.metrics and "val/mlm_loss" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(range(1, 7))
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    final = {a.path for a in client.list_artifacts(run.info.run_id, "final_checkpoint")}
    assert "config.yaml" in top
    assert final == {"final_checkpoint/config.yaml", "final_checkpoint/trainer_state.json"}
