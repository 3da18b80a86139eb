"""One optimizer step and one validation pass, on a DeepSpeed engine."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from data.loader import ResumableTaskLoader, pin
from trainer.distributed import all_reduce_sum
from trainer.engine import BatchLayout, step_gate
from trainer.task_mix import task_of


def draw_task(seed: int, step: int, ratios: dict[str, float]) -> str:
    """The task of optimizer step `step`: a pure function of (seed, step), so it is
    the same on every rank and after a resume, without communication."""
    names = sorted(ratios)
    p = np.array([ratios[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng([seed, step, 7])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


_OBJECTIVE = "_objective"
"""The loss that is backpropagated; reduced with the stats only to test it for NaN/inf."""


@dataclass(frozen=True)
class StepStats:
    means: dict[str, float]
    """Global means of the task's stats (loss, accuracy, ...) over the step's micro-batches."""
    skipped: bool
    """The loss was NaN/inf on some rank: the optimizer did not step."""


def train_step(engine, loader: ResumableTaskLoader, task: str, layout: BatchLayout,
               device: torch.device) -> StepStats:
    """Run the micro-batches of one optimizer step; returns global means of the task's stats.

    Each micro-batch loss is `sum * (world * accum) / N_step`, with N_step the number of
    loss terms in the whole step over all ranks: DeepSpeed divides by accum and averages
    over ranks, so the update is the gradient of the global mean.

    The stats are reduced over ranks before the last `engine.step()`, the one that applies
    the update: a non-finite loss on any rank makes the global loss non-finite, so every
    rank skips the same step without another collective.
    """
    batches = [loader.next() for _ in range(layout.grad_accum)]
    local_n = torch.tensor([float(sum(b["n_items"] for b in batches))], dtype=torch.float64)
    global_n = all_reduce_sum(local_n.to(device)).to(torch.float32)  # [1]
    scale = layout.grad_accum * layout.world_size / global_n
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        result = engine(pin(batch, device), task)
        engine.backward(result.loss_sum * scale.squeeze(0))
        if i + 1 < len(batches):
            engine.step()  # not an accumulation boundary: no update yet
        accumulate(sums, counts, result)
        sums[_OBJECTIVE] = sums.get(_OBJECTIVE, 0) + result.loss_sum.detach().float()
    means = global_means(sums, counts, global_n)
    skipped = not all(math.isfinite(v) for v in means.values())
    del means[_OBJECTIVE]
    with step_gate(engine).closed_if(skipped):
        engine.step()
    return StepStats(means, skipped)


def accumulate(sums: dict, counts: dict, result) -> None:
    for k, v in result.stats.items():
        sums[k] = sums.get(k, 0) + v.detach().float()
    for k, v in result.counts.items():
        counts[k] = counts.get(k, 0) + v.detach().float()


def global_means(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                 global_n: torch.Tensor) -> dict[str, float]:
    """Each stat's sum over ranks divided by its own count over ranks (default: the terms)."""
    names, own = sorted(sums), sorted(counts)
    stacked = all_reduce_sum(torch.stack([sums[k].reshape(()) for k in names] +
                                         [counts[k].reshape(()) for k in own]))
    totals = dict(zip(names, stacked[:len(names)]))
    denominators = dict(zip(own, stacked[len(names):]))
    return {k: (totals[k] / denominators.get(k, global_n.reshape(())).clamp_min(1e-12)).item()
            for k in names}


@torch.no_grad()
def evaluate(engine, task_batches: dict[str, Iterable[dict]], device: torch.device) -> dict[str, float]:
    """Mean loss / accuracy per mix key ("mlm", "coco/itm") over the held-out split, over all ranks."""
    engine.eval()
    metrics: dict[str, float] = {}
    try:
        for key, batches in task_batches.items():
            sums: dict[str, torch.Tensor] = {}
            counts: dict[str, torch.Tensor] = {}
            n = torch.zeros((), dtype=torch.float64, device=device)
            for batch in batches:
                accumulate(sums, counts, engine(pin(batch, device), task_of(key)))
                n += batch["n_items"]
            if not sums:
                continue
            for k, v in global_means(sums, counts, all_reduce_sum(n).float()).items():
                metrics[f"val/{key}_{k}"] = v
    finally:
        engine.train()
    return metrics
