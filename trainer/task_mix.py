"""The run's task mix: which (dataset, task) pairs are drawn, and how often.

UNITER draws one (dataset, task) pair per optimizer step with probability
proportional to its ratio (e.g. all-data: COCO itm 6 / mlm 8 / mrfr 4 / mrc-kl 4,
VG and CC 9 / 12 / 6 / 6, SBU 6 / 8 / 4 / 4). With one dataset (`data.train`)
the pairs are just the tasks of `tasks:` and each is keyed by its task name
("mlm"); with `data.datasets` each pair is keyed "dataset/task" ("coco/mlm").
The key names the loader, its resume position, its RNG streams and its
metrics (`coco/mlm_loss`, `val/coco/mlm_acc`). With weights on the datasets
(ALBEF/open_clip style), each task's batches instead mix the datasets sample
by sample (data/sources.py: MixedSource) and the key is the task name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from trainer.config import Config

SEPARATOR = "/"


@dataclass(frozen=True)
class MixSource:
    """A dataset one mix entry reads."""

    name: str
    train: str
    """Training shards (directory or s3:// prefix holding manifest.json)."""
    val: Optional[str]
    """Held-out shards, or None."""
    weight: float = 1.0
    """Share of the entry's samples (sample mixing; 1.0 otherwise)."""


@dataclass(frozen=True)
class MixEntry:
    key: str
    """"mlm" (single dataset or sample mixing) or "coco/mlm": loader, metric and RNG name."""
    task: str
    """The objective ("mlm", "itm", "mrfr", ...)."""
    ratio: float
    sources: tuple[MixSource, ...]
    """One dataset, or several mixed sample by sample by weight."""

    @property
    def dataset(self) -> str:
        return "+".join(s.name for s in self.sources)

    def val_keys(self) -> list[tuple[str, MixSource]]:
        """(metric key, dataset) of each held-out split: per dataset when mixed."""
        if len(self.sources) == 1:
            return [(self.key, self.sources[0])] if self.sources[0].val else []
        return [(f"{s.name}{SEPARATOR}{self.task}", s) for s in self.sources if s.val]


def task_of(key: str) -> str:
    """The objective of a mix key: "coco/mrc-kl" -> "mrc-kl", "mlm" -> "mlm"."""
    return key.rsplit(SEPARATOR, 1)[-1]


def task_mix(cfg: Config) -> list[MixEntry]:
    """Every mix entry with a positive ratio, sorted by key.

    Weighted datasets (`data.datasets[*].weight`) give one entry per task that mixes
    the datasets sample by sample; otherwise each (dataset, task) pair is an entry.
    """
    data = cfg.data
    if not data.datasets:
        one = (MixSource("train", data.train, data.val),)
        entries = [MixEntry(task, task, ratio, one) for task, ratio in cfg.tasks.items()]
    elif data.sample_mixing:
        mixed = tuple(MixSource(d.name, d.train, d.val, float(d.weight)) for d in data.datasets if d.weight > 0)
        entries = [MixEntry(task, task, ratio, mixed) for task, ratio in cfg.tasks.items()]
    else:
        entries = [MixEntry(f"{d.name}{SEPARATOR}{task}", task, ratio, (MixSource(d.name, d.train, d.val),))
                   for d in data.datasets
                   for task, ratio in (d.tasks or cfg.tasks).items()]
    return sorted((e for e in entries if e.ratio > 0), key=lambda e: e.key)


def mix_ratios(cfg: Config) -> dict[str, float]:
    return {e.key: e.ratio for e in task_mix(cfg)}


def draw_task(seed: int, step: int, ratios: dict[str, float]) -> str:
    """The mix key of optimizer step `step`: a pure function of (seed, step), so it is
    the same on every rank and after a resume, without communication."""
    names = sorted(ratios)
    p = np.array([ratios[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng([seed, step, 7])
    return names[int(rng.choice(len(names), p=p / p.sum()))]
