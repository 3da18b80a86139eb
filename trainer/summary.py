"""End-of-run figures and the summary block printed by `vlpt pretrain`."""
from __future__ import annotations

import json
import os

from trainer.task_mix import task_of

WINDOW = 20


def mlm_loss_drop(metrics_path: str, window: int = WINDOW) -> dict[str, float]:
    """Mean MLM loss of the first and last `window` MLM steps of the whole run.

    metrics.jsonl is appended across resumes; a step logged twice (a crash after a
    checkpoint) keeps its last record.
    """
    by_step: dict[int, float] = {}
    for rec in _records(metrics_path):
        key = rec.get("task")  # "mlm", or "coco/mlm" etc. with several datasets
        if key and task_of(key) == "mlm" and f"{key}_loss" in rec:
            by_step[rec["step"]] = rec[f"{key}_loss"]
    losses = [by_step[s] for s in sorted(by_step)]
    if len(losses) < 2 * window:
        return {}
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return {"mlm_loss_first20": first, "mlm_loss_last20": last,
            "mlm_loss_drop": 1.0 - last / first}


def _records(metrics_path: str):
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                yield json.loads(line)


def validation_trend(metrics_path: str) -> dict[str, tuple[float, float]]:
    """Each validation metric at the first and the last validation of the whole run."""
    by_step: dict[int, dict] = {}
    for rec in _records(metrics_path):
        vals = {k: v for k, v in rec.items() if k.startswith("val/")}
        if vals:
            by_step.setdefault(rec["step"], {}).update(vals)
    if not by_step:
        return {}
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    return {k: (first[k], last[k]) for k in sorted(last) if k in first}


def retrieval_lines(summary: dict) -> list[str]:
    """ALBEF's final held-out retrieval, one line per split and direction."""
    lines = []
    for key in sorted(k for k in summary if k.startswith("val/") and k.endswith("_t2i_r1")):
        split = key[len("val/"):-len("_t2i_r1")]
        for direction, name in (("t2i", "text->image"), ("i2t", "image->text")):
            r = [summary[f"val/{split}_{direction}_r{at}"] for at in (1, 5, 10)]
            lines.append(f"retrieval {name:<12}R@1 {r[0]:.1f}%  R@5 {r[1]:.1f}%  R@10 {r[2]:.1f}%  ({split})")
        chance = {d: summary.get(f"val/{split}_{d}_r1_chance") for d in ("t2i", "i2t")}
        lines.append("  R@1 by chance  " + "  ".join(f"{name} {chance[d]:.2f}%" for d, name in
                                                    (("t2i", "text->image"), ("i2t", "image->text"))
                                                    if chance[d] is not None))
    return lines


def trend_lines(trend: dict[str, tuple[float, float]]) -> list[str]:
    """One aligned line per metric: the key column is as wide as the longest key, plus two spaces."""
    width = max((len(k) for k in trend), default=0) + 2
    firsts = {k: f"{first:.4f}" for k, (first, _) in trend.items()}
    value_width = max((len(v) for v in firsts.values()), default=0)
    return [f"  {k:<{width}}{firsts[k]:>{value_width}} -> {last:.4f}" for k, (_, last) in trend.items()]


def print_summary(summary: dict, run_dir: str) -> None:
    command = "finetune" if summary.get("stage") == "finetune" else "pretrain"
    lines = ["", "=" * 72, f"vlpt {command}: done", "=" * 72,
             f"steps             {summary['steps']} ({summary['steps_this_run']} this run, "
             f"{summary['seconds']:.0f} s, {summary['samples_per_s']:.0f} samples/s)",
             f"task steps        {summary['task_counts']}"]
    if "mlm_loss_first20" in summary:
        lines.append(f"MLM loss          first {WINDOW} MLM steps {summary['mlm_loss_first20']:.4f} -> "
                     f"last {WINDOW} {summary['mlm_loss_last20']:.4f} "
                     f"({100 * summary['mlm_loss_drop']:.1f}% lower)")
    if summary.get("data_skipped"):
        reasons = ", ".join(f"{k}={v:,}" for k, v in summary["data_skipped"].items())
        lines.append(f"bad samples       {sum(summary['data_skipped'].values()):,} of {summary['data_seen']:,} "
                     f"skipped ({summary['data_skipped_per_1000']:.1f} per 1,000): {reasons}")
    if summary.get("data_filtered_length"):
        lines.append(f"filtered by length {summary['data_filtered_length']:,} of {summary['data_seen']:,} captions "
                     "over data.max_txt_len word pieces (dropped, not bad input)")
    if summary.get("val_data_skipped"):
        reasons = ", ".join(f"{k}={v:,}" for k, v in summary["val_data_skipped"].items())
        lines.append(f"bad held-out      skipped in the final validation: {reasons}")
    lines += retrieval_lines(summary)
    trend = validation_trend(os.path.join(run_dir, "metrics.jsonl"))
    if trend:
        lines.append("held-out          first validation -> last")
    lines += trend_lines(trend)
    lines += [f"checkpoint        {summary['checkpoint']}",
              f"metrics           {os.path.join(run_dir, 'metrics.jsonl')}"]
    if summary["mlflow_ui"]:
        lines += [f"MLflow run        {summary['mlflow_run_id']}", f"open it with      {summary['mlflow_ui']}"]
    else:
        lines.append("MLflow            off (tracking.enabled: false)")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
