"""One optimizer step for every recipe, and the reduction of its stats over ranks.

Each micro-batch's summed losses are divided by their term counts over the whole step and
all ranks, and scaled by `world * accum` (DeepSpeed divides by accum and averages over ranks),
so the update is the gradient of the global mean of each loss whatever the split of the
global batch into ranks and micro-batches. The stats are reduced over ranks before the last
`engine.step()`, the one that applies the update, together with the gradient norm
(trainer/gradients.py): a non-finite loss or gradient on any rank makes them non-finite, so every
rank skips the same step without another collective. That reduction is the step's only read of a
device value on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from data.loader import ResumableTaskLoader, pin
from trainer.distributed import all_reduce_sum
from trainer.engine import BatchLayout, step_gate
from trainer.gradients import GradientPolicy, clip_, final_gradients, squared_norm_share
from trainer.recipes.base import Recipe, StepContext
from trainer.step_timer import StepTimer

_STOP = "_stop"
"""Summed over ranks with the stats: > 0 when some rank was asked to stop."""
_GRAD_NORM_SQ = "_grad_norm_sq"
_OBJECTIVE = "_objective"
"""The loss that is backpropagated; reduced with the stats only to test it for NaN/inf."""
ITEMS = "n_items"
"""Every batch's own count of loss terms: the default denominator of its stats."""


@dataclass(frozen=True)
class StepStats:
    means: dict[str, float]
    """Global means of the task's stats (loss, accuracy, ...) over the step's micro-batches."""
    skipped: bool
    """The loss or the gradient norm was NaN/inf on some rank: the optimizer did not step."""
    grad_norm: Optional[float] = None
    """Global norm of the step's gradient before clipping (None where DeepSpeed keeps it: ZeRO-1/3)."""
    stop_requested: bool = False
    """Some rank was asked to stop (a signal) by the end of this step's backward; the same on every rank."""


def optimizer_step(engine, recipe: Recipe, loader: ResumableTaskLoader, task: str, layout: BatchLayout,
                   ctx: StepContext, timer: Optional[StepTimer] = None,
                   stop_requested: Callable[[], bool] = lambda: False) -> StepStats:
    """Run the `grad_accum` micro-batches of one optimizer step of `task`; returns global means.

    The step reads one value set from the device: the stats, the gradient norm and the stop flag,
    reduced over ranks in one all-reduce (docs/design.md, "One host synchronisation a step")."""
    timer = timer or StepTimer.off()
    timer.start_step()
    with timer.phase("data"):
        batches = [pin(loader.next(), ctx.device) for _ in range(layout.grad_accum)]
    with timer.phase("forward"):  # ALBEF's teacher runs here
        plan = recipe.begin_step(engine, batches, task, ctx)
    totals = global_totals([{ITEMS: float(b["n_items"]), **recipe.term_counts(b, task)} for b in batches],
                           ctx.device)
    factor = layout.grad_accum * layout.world_size
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        with timer.phase("forward"):
            result = engine(batch, *plan.forward_args(i, batch))
            objective = normalised_loss(result.losses, totals, factor)
        with timer.phase("backward"):
            engine.backward(objective)
        if i + 1 < len(batches):
            engine.step()  # not an accumulation boundary: no update yet
        accumulate(sums, counts, result)
        sums[_OBJECTIVE] = sums.get(_OBJECTIVE, 0) + objective.detach().float()
    with timer.phase("comm"):
        # asked after the backward, so a signal that came during this step is known to all after it
        means, grad_norm, stop = reduce_step(engine, sums, counts, totals[ITEMS], stop_requested(), ctx.device)
    skipped = not all(math.isfinite(v) for v in means.values()) or not math.isfinite(grad_norm or 0.0)
    del means[_OBJECTIVE]
    plan.finish(means, skipped)
    with timer.phase("optimizer"), step_gate(engine).closed_if(skipped):
        engine.step()
    return StepStats(means, skipped, grad_norm, stop)


def reduce_step(engine, sums: dict, counts: dict, global_n: torch.Tensor, stop_flag: bool,
                device: torch.device) -> tuple[dict[str, float], Optional[float], bool]:
    """The step's stats, gradient norm and stop flag over all ranks (one all-reduce, one read on the
    host); clips the gradients here where trainer/gradients.py does (ZeRO-2)."""
    policy: GradientPolicy = engine.gradient_policy
    grads = final_gradients(engine, policy)
    extra = {_STOP: torch.full((), float(stop_flag), device=device)}  # a fill, not a blocking copy
    if grads is not None:
        extra[_GRAD_NORM_SQ] = squared_norm_share(grads, policy.replicas, device)
    means, summed = reduce_stats(sums, counts, global_n, extra)
    grad_norm = math.sqrt(summed[_GRAD_NORM_SQ]) if grads is not None else None
    if grads is not None and policy.clip and math.isfinite(grad_norm):
        clip_(grads, grad_norm, policy.clip)
    return means, grad_norm, summed[_STOP] > 0


def global_totals(per_batch: list[dict[str, float]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each count summed over the micro-batches and all ranks (one all-reduce, exact in float64),
    as fp32 scalars of at least 1: a loss with no terms contributes 0, not 0/0."""
    names = sorted(per_batch[0])
    local = torch.tensor([sum(b[n] for b in per_batch) for n in names], dtype=torch.float64)
    reduced = all_reduce_sum(host_to_device(local, device)).to(torch.float32).clamp_min(1.0)  # [len(names)]
    return {n: reduced[i] for i, n in enumerate(names)}


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a copy from pageable memory would
    synchronise the stream, one from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    return reduce_stats(sums, counts, global_n, {})[0]


def reduce_stats(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], global_n: torch.Tensor,
                 extra: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """`global_means`, and each `extra` value summed over ranks: one all-reduce and one read on the
    host for all of them."""
    names, own, more = sorted(sums), sorted(counts), sorted(extra)
    stacked = all_reduce_sum(torch.stack([sums[k].reshape(()) for k in names] +
                                         [counts[k].reshape(()) for k in own] +
                                         [extra[k].reshape(()).to(torch.float32) for k in more]))
    totals = dict(zip(names, stacked[:len(names)]))
    denominators = dict(zip(own, stacked[len(names):len(names) + len(own)]))
    means = [totals[k] / denominators.get(k, global_n.reshape(())).clamp_min(1e-12) for k in names]
    values = torch.stack(means + list(stacked[len(names) + len(own):])).tolist()  # the step's one host read
    return dict(zip(names, values[:len(names)])), dict(zip(more, values[len(names):]))
