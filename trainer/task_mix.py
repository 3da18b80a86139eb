"""The run's task mix: which (dataset, task) pairs are drawn, and how often.

UNITER draws one (dataset, task) pair per optimizer step with probability
proportional to its ratio (e.g. all-data: COCO itm 6 / mlm 8 / mrfr 4 / mrc-kl 4,
VG and CC 9 / 12 / 6 / 6, SBU 6 / 8 / 4 / 4). With one dataset (`data.train`)
the pairs are just the tasks of `tasks:` and each is keyed by its task name
("mlm"); with `data.datasets` each pair is keyed "dataset/task" ("coco/mlm").
The key names the loader, its resume position, its RNG streams and its
metrics (`coco/mlm_loss`, `val/coco/mlm_acc`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import Config

SEPARATOR = "/"


@dataclass(frozen=True)
class MixEntry:
    key: str
    """"mlm" (single dataset) or "coco/mlm": loader, metric and RNG name."""
    task: str
    """The objective ("mlm", "itm", "mrfr", ...)."""
    dataset: str
    train: str
    """Training shard directory (with manifest.json)."""
    val: Optional[str]
    """Held-out shard directory, or None."""
    ratio: float


def task_of(key: str) -> str:
    """The objective of a mix key: "coco/mrc-kl" -> "mrc-kl", "mlm" -> "mlm"."""
    return key.rsplit(SEPARATOR, 1)[-1]


def task_mix(cfg: Config) -> list[MixEntry]:
    """Every (dataset, task) pair with a positive ratio, sorted by key."""
    if not cfg.data.datasets:
        entries = [MixEntry(task, task, "train", cfg.data.train, cfg.data.val, ratio)
                   for task, ratio in cfg.tasks.items()]
    else:
        entries = [MixEntry(f"{d.name}{SEPARATOR}{task}", task, d.name, d.train, d.val, ratio)
                   for d in cfg.data.datasets
                   for task, ratio in (d.tasks or cfg.tasks).items()]
    return sorted((e for e in entries if e.ratio > 0), key=lambda e: e.key)


def mix_ratios(cfg: Config) -> dict[str, float]:
    return {e.key: e.ratio for e in task_mix(cfg)}
