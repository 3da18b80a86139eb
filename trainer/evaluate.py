"""`vlpt evaluate`: score a fine-tuned checkpoint on a task's held-out split and write the predictions file
the task's official evaluator reads (docs/downstream.md, "Evaluation")."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import torch

from data.atomic_write import write_atomic
from trainer.config import Config
from trainer.config_files import ConfigError
from trainer.distributed import setup_distributed, teardown
from trainer.downstream_eval import score_split
from trainer.models.downstream_load import load_pretrained
from trainer.models.pretrained_weights import read_weights
from trainer.predictions import write_predictions
from trainer.run_setup import check_inputs, checked_recipe, setup_logging

log = logging.getLogger("vlpt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def evaluate(cfg: Config, checkpoint: str, split: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Collective. Metrics of `checkpoint` on `split` (default finetune.val); rank 0 writes the
    predictions and metrics.json into `out` (default <train.run_dir>/eval)."""
    if cfg.stage != "finetune":
        raise ConfigError(f"vlpt evaluate scores fine-tuned models: the config has stage: {cfg.stage}; use a "
                          "configs/finetune/ config (stage: finetune)")
    split = split or cfg.finetune.val
    if not split:
        raise ConfigError("vlpt evaluate: give --split <task folder> or set finetune.val")
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, val=split, train=None, init_from=None))
    check_inputs(cfg)
    joined = torch.distributed.is_initialized()
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    setup_logging(info)
    recipe, tok = checked_recipe(cfg)
    model = _load_model(recipe, checkpoint).to(info.device, DTYPES[cfg.precision.dtype])
    skipped: dict[str, int] = {}
    result = score_split(model, recipe, tok, recipe.val_folder.examples, info, skipped, full=True)
    summary = {"task": recipe.task, "checkpoint": checkpoint, "split": split,
               "examples": len(recipe.val_folder.examples), "metrics": result.metrics,
               "skipped": {**recipe.val_folder.skipped, **skipped}}
    if info.is_main:
        out = out or os.path.join(cfg.train.run_dir, "eval")
        summary["files"] = write_predictions(recipe.task, out, result.predictions) + [_write_summary(out, summary)]
        print(format_metrics(recipe.task, result.metrics, summary["files"]), flush=True)
    if not joined:
        teardown()
    return summary


def _load_model(recipe, checkpoint: str):
    model = recipe.build_model()  # finetune.init_from is cleared: the head's own init, then the checkpoint
    sd, where = read_weights(checkpoint, "--checkpoint")
    try:
        report = load_pretrained(model, sd, model.head)
    except ValueError as e:
        raise ConfigError(f"--checkpoint {checkpoint}: {e}") from None
    if report.missing:
        raise ConfigError(f"--checkpoint {checkpoint} has no {recipe.task} head ({', '.join(report.missing[:3])} "
                          f"missing): it is not fine-tuned on {recipe.task}; pass a `vlpt finetune` run or checkpoint")
    log.info("evaluating %s", where)
    return model.eval()


def _write_summary(out: str, summary: dict) -> str:
    path = os.path.join(out, "metrics.json")
    write_atomic(path, json.dumps(summary, indent=1))
    return path


def format_metrics(task: str, metrics: dict[str, float], files: list[str]) -> str:
    lines = [f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))]
    lines += [f"  wrote {p}" for p in files]
    return "\n".join(lines)
