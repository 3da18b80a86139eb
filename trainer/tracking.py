"""Run tracking on rank 0: MLflow plus a `metrics.jsonl` beside the checkpoints.

The default store is SQLite inside the run folder (MLflow 3 keeps the plain
file store in maintenance mode), with artifacts in `<run_dir>/mlartifacts`.
A tracking failure never stops training: it is logged as a warning and the
run goes on; metrics.jsonl always has everything.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Optional

from trainer.config import TrackingConfig

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: str, enabled: bool,
                 resume_run_id: Optional[str] = None):
        self.run_dir = os.path.abspath(run_dir)
        self.enabled = enabled
        self.uri = cfg.uri or f"sqlite:///{os.path.join(self.run_dir, 'mlflow.db')}"
        self.run_id: Optional[str] = None
        self.failures = 0
        self._client = None
        self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a") if enabled else None
        if enabled and cfg.enabled:
            self._call(lambda: self._start(cfg, resume_run_id), "start the MLflow run")

    def _start(self, cfg: TrackingConfig, resume_run_id: Optional[str]) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            cfg.experiment, artifact_location=os.path.join(self.run_dir, "mlartifacts"))
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
        else:
            name = cfg.run_name or os.path.basename(self.run_dir.rstrip("/"))
            self.run_id = client.create_run(exp_id, run_name=name).info.run_id
        self._client = client

    def _call(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except Exception as e:  # tracking must never stop training; say so loudly instead
            self.failures += 1
            log.warning("MLflow: could not %s (%s: %s); training goes on, metrics.jsonl keeps the numbers",
                        what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps params per batch call
            chunk = items[i:i + 100]
            self._call(lambda: self._client.log_batch(self.run_id, params=chunk), "log params")

    def log_metrics(self, metrics: dict[str, float], step: int, **labels: str) -> None:
        """Numbers go to MLflow and metrics.jsonl; labels (e.g. task=) to metrics.jsonl only."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **labels, **metrics}) + "\n")
        self._jsonl.flush()
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()]
        self._call(lambda: self._client.log_batch(self.run_id, metrics=items), "log metrics")

    def log_artifact(self, path: str, subdir: Optional[str] = None) -> None:
        if self.active and os.path.exists(path):
            self._call(lambda: self._client.log_artifact(self.run_id, path, subdir), f"upload {path}")

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self._call(lambda: self._client.set_tag(self.run_id, key, value), "set a tag")

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call(lambda: self._client.set_terminated(self.run_id, status=status), "end the run")
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}"
