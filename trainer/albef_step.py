"""One ALBEF optimizer step (DESIGN §4): the teacher, outside the DeepSpeed engine, first
encodes every micro-batch of the step; the momentum features of the whole global batch are
all-gathered; then each micro-batch's student loss contrasts against them plus the queue;
the queue takes the global batch once, after the last micro-batch.

Each loss is a sum over its terms divided by its term count over the whole step and all
ranks (ITC: B pairs, ITM: 3B pairs, MLM: the masked tokens), so the update is the gradient
of `mean ITC + mean ITM + mean MLM` of the global batch whatever its split into ranks and
micro-batches; the hard negatives are drawn from a seed of (seed, step, stream) for the
same reason.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from data.loader import ResumableTaskLoader, pin
from trainer.distributed import all_gather_varying_rows, all_reduce_sum
from trainer.engine import BatchLayout, step_gate
from trainer.models.albef import TRAIN_TASK, AlbefTeacher, TeacherTargets
from trainer.steps import StepStats, accumulate, global_means

_OBJECTIVE = "_objective"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_precision(device: torch.device, dtype: str):
    """The teacher keeps fp32 weights; under a bf16/fp16 run it computes in that dtype."""
    if dtype not in _AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[dtype])


def negatives_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.default_rng([seed, step, stream, 4]).integers(2 ** 62))


def albef_train_step(engine, teacher: AlbefTeacher, loader: ResumableTaskLoader, layout: BatchLayout,
                     device: torch.device, *, step: int, seed: int, alpha: float, precision: str,
                     update_teacher: bool = True) -> StepStats:
    """Optimizer step `step` (counted from 0). `update_teacher` is False right after a skipped
    (non-finite) step: the student did not move, so the EMA must not apply it twice."""
    batches = [pin(loader.next(), device) for _ in range(layout.grad_accum)]
    if update_teacher:
        teacher.update(engine.module)
    with teacher_precision(device, precision):
        encoded = [teacher.encode(b) for b in batches]  # (image tokens, image feat, text feat)
    local = torch.cat([torch.cat([image_f, text_f], dim=1) for _, image_f, text_f in encoded])  # [rows, 2D]
    features, sizes = all_gather_varying_rows(local)  # [B, 2D], rows in stream order
    image_all, text_all = features.chunk(2, dim=1)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    offset = sum(sizes[:rank])
    n_masked = all_reduce_sum(torch.tensor([float(sum(b["mlm_index"].numel() for b in batches))], device=device))
    rows = float(sum(sizes))
    totals = {"itc": rows, "itm": 3.0 * rows, "mlm": n_masked.clamp_min(1.0).squeeze(0)}
    scale = layout.grad_accum * layout.world_size  # DeepSpeed divides by accum and averages ranks
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, (batch, (image_m, _, _)) in enumerate(zip(batches, encoded)):
        with teacher_precision(device, precision):
            logits_m = teacher.mlm_logits(batch, image_m)  # [N, V]
        targets = TeacherTargets(image_all, text_all, teacher.queues.image_queue, teacher.queues.text_queue,
                                 offset, logits_m, alpha, negatives_seed(seed, step, int(batch["stream"])))
        result = engine(batch, TRAIN_TASK, targets)
        objective = sum(result.losses[k] / totals[k] for k in result.losses) * scale
        engine.backward(objective)
        if i + 1 < len(batches):
            engine.step()  # not an accumulation boundary: no update yet
        accumulate(sums, counts, result)
        sums[_OBJECTIVE] = sums.get(_OBJECTIVE, 0) + objective.detach().float()
        offset += batch["n_items"]
    means = global_means(sums, counts, torch.tensor(rows, device=device))
    skipped = not all(math.isfinite(v) for v in means.values())
    del means[_OBJECTIVE]
    means["loss"] = means["itc"] + means["itm"] + means["mlm"]
    if not skipped:  # a skipped step leaves the queue as it was, like the weights
        teacher.queues.push(image_all, text_all)
    with step_gate(engine).closed_if(skipped):
        engine.step()
    return StepStats(means, skipped)

