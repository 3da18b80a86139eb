"""End-of-run figures and the summary block printed by `vlpt pretrain`."""
from __future__ import annotations

import json
import os

WINDOW = 20


def mlm_loss_drop(metrics_path: str, window: int = WINDOW) -> dict[str, float]:
    """Mean MLM loss of the first and last `window` MLM steps of the whole run.

    metrics.jsonl is appended across resumes; a step logged twice (a crash after a
    checkpoint) keeps its last record.
    """
    by_step: dict[int, float] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("task") == "mlm" and "mlm_loss" in rec:
                    by_step[rec["step"]] = rec["mlm_loss"]
    losses = [by_step[s] for s in sorted(by_step)]
    if len(losses) < 2 * window:
        return {}
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return {"mlm_loss_first20": first, "mlm_loss_last20": last,
            "mlm_loss_drop": 1.0 - last / first}


def print_summary(summary: dict, run_dir: str) -> None:
    lines = ["", "=" * 72, "vlpt pretrain: done", "=" * 72,
             f"steps             {summary['steps']} ({summary['steps_this_run']} this run, "
             f"{summary['seconds']:.0f} s, {summary['samples_per_s']:.0f} samples/s)",
             f"task steps        {summary['task_counts']}"]
    if "mlm_loss_first20" in summary:
        lines.append(f"MLM loss          first {WINDOW} MLM steps {summary['mlm_loss_first20']:.4f} -> "
                     f"last {WINDOW} {summary['mlm_loss_last20']:.4f} "
                     f"({100 * summary['mlm_loss_drop']:.1f}% lower)")
    for k in sorted(k for k in summary if k.startswith("val/")):
        lines.append(f"{k:<18}{summary[k]:.4f}   (held-out)")
    lines += [f"checkpoint        {summary['checkpoint']}",
              f"metrics           {os.path.join(run_dir, 'metrics.jsonl')}",
              f"MLflow run        {summary['mlflow_run_id']}",
              f"open it with      {summary['mlflow_ui']}", "=" * 72]
    print("\n".join(lines), flush=True)
