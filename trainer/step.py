"""One optimizer step for every recipe, and the reduction of its stats over ranks.

Each micro-batch's summed losses are divided by their term counts over the whole step and
all ranks, and scaled by `world * accum` (DeepSpeed divides by accum and averages over ranks),
so the update is the gradient of the global mean of each loss whatever the split of the
global batch into ranks and micro-batches. The stats are reduced over ranks before the last
`engine.step()`, the one that applies the update: a non-finite loss on any rank makes the
global objective non-finite, so every rank skips the same step without another collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from data.loader import ResumableTaskLoader, pin
from trainer.distributed import all_reduce_sum
from trainer.engine import BatchLayout, step_gate
from trainer.recipes.base import Recipe, StepContext

_OBJECTIVE = "_objective"
"""The loss that is backpropagated; reduced with the stats only to test it for NaN/inf."""
ITEMS = "n_items"
"""Every batch's own count of loss terms: the default denominator of its stats."""


@dataclass(frozen=True)
class StepStats:
    means: dict[str, float]
    """Global means of the task's stats (loss, accuracy, ...) over the step's micro-batches."""
    skipped: bool
    """The loss was NaN/inf on some rank: the optimizer did not step."""


def optimizer_step(engine, recipe: Recipe, loader: ResumableTaskLoader, task: str, layout: BatchLayout,
                   ctx: StepContext) -> StepStats:
    """Run the `grad_accum` micro-batches of one optimizer step of `task`; returns global means."""
    batches = [pin(loader.next(), ctx.device) for _ in range(layout.grad_accum)]
    plan = recipe.begin_step(engine, batches, task, ctx)
    totals = global_totals([{ITEMS: float(b["n_items"]), **recipe.term_counts(b, task)} for b in batches],
                           ctx.device)
    factor = layout.grad_accum * layout.world_size
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        result = engine(batch, *plan.forward_args(i, batch))
        objective = normalised_loss(result.losses, totals, factor)
        engine.backward(objective)
        if i + 1 < len(batches):
            engine.step()  # not an accumulation boundary: no update yet
        accumulate(sums, counts, result)
        sums[_OBJECTIVE] = sums.get(_OBJECTIVE, 0) + objective.detach().float()
    means = global_means(sums, counts, totals[ITEMS])
    skipped = not all(math.isfinite(v) for v in means.values())
    del means[_OBJECTIVE]
    plan.finish(means, skipped)
    with step_gate(engine).closed_if(skipped):
        engine.step()
    return StepStats(means, skipped)


def global_totals(per_batch: list[dict[str, float]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each count summed over the micro-batches and all ranks (one all-reduce, exact in float64),
    as fp32 scalars of at least 1: a loss with no terms contributes 0, not 0/0."""
    names = sorted(per_batch[0])
    local = torch.tensor([sum(b[n] for b in per_batch) for n in names], dtype=torch.float64)
    reduced = all_reduce_sum(local.to(device)).to(torch.float32).clamp_min(1.0)  # [len(names)]
    return {n: reduced[i] for i, n in enumerate(names)}


def normalised_loss(losses: dict[str, torch.Tensor], totals: dict[str, torch.Tensor], factor: int) -> torch.Tensor:
    """`factor * sum_k losses[k] / totals[k]`. A single loss is multiplied by `factor / total`, several
    are each divided by their total, then scaled: equal in exact arithmetic, and each order is the one
    its family trained with before the recipes were unified, so its losses are bit-identical."""
    if len(losses) == 1:
        (name, loss), = losses.items()
        return loss * (factor / totals[name])
    return sum(loss / totals[name] for name, loss in losses.items()) * factor


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
