"""`vlpt evaluate`: score a fine-tuned checkpoint on a task's held-out split and write the predictions file
the task's official evaluator reads (docs/downstream.md, "Evaluation")."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from data.atomic_write import write_atomic
from trainer.config import Config
from trainer.config_files import ConfigError
from trainer.distributed import setup_distributed, teardown
from trainer.predictions import write_predictions
from trainer.recipes import recipe_for
from trainer.run_setup import check_inputs, checked_recipe, setup_logging

log = logging.getLogger("vlpt")


def evaluate(cfg: Config, checkpoint: str, split: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Collective. Metrics of `checkpoint` on `split` (default: the config's held-out split); rank 0 writes
    the predictions and metrics.json into `out` (default <train.run_dir>/eval)."""
    if cfg.stage != "finetune":
        raise ConfigError(f"vlpt evaluate scores fine-tuned models: the config has stage: {cfg.stage}; use a "
                          "configs/finetune/ config (stage: finetune)")
    try:
        cfg = recipe_for(cfg).evaluation_config(cfg, split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_inputs(cfg)
    joined = torch.distributed.is_initialized()
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    setup_logging(info)
    recipe, tok = checked_recipe(cfg)
    result = recipe.evaluate(checkpoint, tok, info)
    summary = {"task": result.task, "checkpoint": checkpoint, "split": result.split, "examples": result.examples,
               "metrics": result.metrics, "skipped": result.skipped}
    if info.is_main:
        out = out or os.path.join(cfg.train.run_dir, "eval")
        summary["files"] = write_predictions(result.task, out, result.predictions) + [_write_summary(out, summary)]
        print(format_metrics(result.task, result.metrics, summary["files"]), flush=True)
    if not joined:
        teardown()
    return summary


def _write_summary(out: str, summary: dict) -> str:
    path = os.path.join(out, "metrics.json")
    write_atomic(path, json.dumps(summary, indent=1))
    return path


def format_metrics(task: str, metrics: dict[str, float], files: list[str]) -> str:
    lines = [f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))]
    lines += [f"  wrote {p}" for p in files]
    return "\n".join(lines)
