"""Run tracking on rank 0: MLflow plus a `metrics.jsonl` beside the checkpoints.

The default store is SQLite inside the run folder (MLflow 3 keeps the plain
file store in maintenance mode), with artifacts in `<run_dir>/mlartifacts`.

A tracking server that is down or slow never stops training. Every record goes
to metrics.jsonl first, then into a queue for MLflow; a failed call (connection
refused, timeout, 5xx) leaves the queue as it is, warns once per outage, and is
retried no sooner than `retry_interval_s` later (doubling up to
`retry_max_interval_s`), so a dead server costs one short timeout per interval,
not one per step. A record the server rejects (a 4xx) is dropped with a warning
instead of blocking the queue. At the end the queue is sent one last time.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any, Callable, Optional

from trainer.config import TrackingConfig

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH_METRICS = 1000  # MLflow's limit on metrics per log_batch call


REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
            "INVALID_STATE"}


def _rejected(e: Exception) -> bool:
    """True when the store answered and refused this record (retrying will not help)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, RestException):
        status = e.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return isinstance(e, MlflowException) and e.error_code in REFUSALS


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: str, enabled: bool,
                 resume_run_id: Optional[str] = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.run_dir = os.path.abspath(run_dir)
        self.enabled = enabled
        self.uri = cfg.uri or f"sqlite:///{os.path.join(self.run_dir, 'mlflow.db')}"
        self.run_id: Optional[str] = resume_run_id
        self.failures = 0
        self.dropped = 0
        self._resume = resume_run_id is not None
        self._client = None
        self._queue: deque[tuple[str, Any]] = deque()
        self._queued_metrics = 0
        self._clock = clock
        self._retry_at = 0.0
        self._interval = cfg.retry_interval_s
        self._down = False
        self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a") if enabled else None
        self._mlflow = enabled and cfg.enabled
        if self._mlflow:
            # Read by MLflow at each request; a user's own setting wins.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, cfg.request_timeout_s))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # we retry, later
            self._flush()

    # ------------------------------------------------------------------ sending

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.uri)
        if self._resume:
            client.update_run(self.run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(self.cfg.experiment)
            local = None if self.cfg.uri else os.path.join(self.run_dir, "mlartifacts")
            exp_id = exp.experiment_id if exp else client.create_experiment(
                self.cfg.experiment, artifact_location=local)
            name = self.cfg.run_name or os.path.basename(self.run_dir.rstrip("/"))
            self.run_id = client.create_run(exp_id, run_name=name).info.run_id
        self._client = client

    def _send(self, kind: str, payload: Any) -> None:
        c, run = self._client, self.run_id
        if kind == "params":
            c.log_batch(run, params=payload)
        elif kind == "metrics":
            c.log_batch(run, metrics=payload)
        elif kind == "tag":
            c.set_tag(run, *payload)
        elif kind == "artifact":
            if os.path.exists(payload[0]):  # a pruned checkpoint's file while the server was down
                c.log_artifact(run, *payload)
            else:
                log.warning("MLflow: %s is gone, not uploaded", payload[0])
        elif kind == "end":
            c.set_terminated(run, status=payload)
        else:
            raise AssertionError(kind)

    def _next(self) -> tuple[str, Any, int]:
        """The head of the queue, consecutive metric records merged up to one batch call."""
        kind, payload = self._queue[0]
        if kind != "metrics":
            return kind, payload, 1
        merged, n = [], 0
        for k, p in self._queue:
            if k != "metrics" or len(merged) + len(p) > BATCH_METRICS and merged:
                break
            merged += p
            n += 1
        return kind, merged, n

    def _flush(self, force: bool = False) -> None:
        if not self._mlflow or (not force and self._clock() < self._retry_at):
            return
        try:
            if self._client is None:
                self._start()
            while self._queue:
                kind, payload, n = self._next()
                try:
                    self._send(kind, payload)
                except Exception as e:
                    if not _rejected(e):
                        raise
                    self.dropped += 1
                    log.warning("MLflow refused a %s record (%s); dropped, metrics.jsonl keeps it",
                                kind, str(e).splitlines()[0])
                for _ in range(n):
                    self._pop()
        except Exception as e:  # tracking must never stop training: buffer and retry later
            self._outage(e)
            return
        if self._down:
            log.warning("MLflow reachable again at %s: buffered records sent", self.uri)
        self._down, self._interval = False, self.cfg.retry_interval_s

    def _outage(self, e: Exception) -> None:
        self.failures += 1
        if not self._down:
            log.warning("MLflow at %s unreachable (%s: %s); training goes on, records are buffered and "
                        "retried, metrics.jsonl keeps everything", self.uri, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        self._down = True
        self._retry_at = self._clock() + self._interval
        self._interval = min(2 * self._interval, self.cfg.retry_max_interval_s)

    def _pop(self) -> None:
        kind, payload = self._queue.popleft()
        if kind == "metrics":
            self._queued_metrics -= len(payload)

    def _enqueue(self, kind: str, payload: Any) -> None:
        if not self._mlflow:
            return
        self._queue.append((kind, payload))
        if kind == "metrics":
            self._queued_metrics += len(payload)
            while self._queued_metrics > self.cfg.max_buffered:
                oldest = next(i for i, (k, _) in enumerate(self._queue) if k == "metrics")
                self._queued_metrics -= len(self._queue[oldest][1])
                self.dropped += 1
                del self._queue[oldest]
        self._flush()

    # ------------------------------------------------------------------ API

    def log_params(self, params: dict[str, Any]) -> None:
        if not self._mlflow:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps params per batch call
            self._enqueue("params", items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, **labels: str) -> None:
        """Numbers go to MLflow and metrics.jsonl; labels (e.g. task=) to metrics.jsonl only."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **labels, **metrics}) + "\n")
        self._jsonl.flush()
        if not self._mlflow:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._enqueue("metrics", [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str, subdir: Optional[str] = None) -> None:
        if os.path.exists(path):
            self._enqueue("artifact", (path, subdir))

    def set_tag(self, key: str, value: str) -> None:
        self._enqueue("tag", (key, value))

    def finish(self, status: str = "FINISHED") -> None:
        if self._mlflow:
            self._queue.append(("end", status))
            self._flush(force=True)
            if self._queue:
                log.warning("MLflow: %d records could not be sent to %s; metrics.jsonl has every metric",
                            len(self._queue), self.uri)
            self._mlflow = False
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}"
