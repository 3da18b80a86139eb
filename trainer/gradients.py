"""The step's final gradients: where DeepSpeed keeps them, their global norm, and the clip.

The norm is the one reduction over the gradients a step makes: clipping needs it, and a NaN/inf
anywhere makes it non-finite, so it is also the step's test for bad gradients (no per-parameter
`isfinite` pass). Its square travels in the step's one all-reduce of stats (trainer/step.py) and
reaches the host with them, so it costs no synchronisation of its own.

Where the final gradients are after the step's last backward:
- ZeRO-0: each parameter's `.grad`, already averaged over ranks (every rank holds all of them);
- ZeRO-2: `optimizer.averaged_gradients`, this rank's partition, reduced during the backward.
At ZeRO-2 in fp32/bf16 (no loss scale, no offload) DeepSpeed's own norm and overflow checks are
switched off (trainer/engine.py), because each reads a value on the host (3-4 synchronisations a
step), and the clip is done here. Elsewhere DeepSpeed clips as before: ZeRO-0 in fp32 keeps its
clip so the demo's losses stay bit-identical; ZeRO-1/3, fp16 and offload keep DeepSpeed's checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from trainer.config import ParallelConfig, PrecisionConfig

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as DeepSpeed's and torch's clips do."""


def trainer_clips(parallel: ParallelConfig, precision: PrecisionConfig) -> bool:
    """Whether this module clips (and DeepSpeed's host-side checks are off) for these settings."""
    return parallel.zero_stage == 2 and precision.dtype != "fp16" and not parallel.offload_optimizer


def final_gradients(engine, policy: "GradientPolicy") -> Optional[list[Tensor]]:
    """This rank's final gradients of the step, or None where they are not ours to read: ZeRO-1/3
    and offload (DeepSpeed holds them in its own layout), fp16 (they carry the loss scale, and
    DeepSpeed's scaler skips their overflows itself)."""
    zero_stage = policy.zero_stage
    if not policy.measured:
        return None
    if zero_stage == 0:
        return [p.grad for p in engine.module.parameters() if p.grad is not None]
    groups = getattr(engine.optimizer, "averaged_gradients", None)
    if zero_stage != 2 or not isinstance(groups, dict):
        return None
    grads = []
    for i in sorted(groups):
        group = groups[i]
        flat = getattr(group, "flat_partition", None)  # the entries are views of it: take it once
        grads.extend([flat] if flat is not None else [g for g in group or () if g is not None])
    return grads


def squared_norm_share(grads: list[Tensor], replicas: int, device: torch.device) -> Tensor:
    """This rank's share of the step's squared gradient norm (fp32 scalar): summed over ranks it is
    the global `||g||^2`. `replicas` ranks hold each gradient (the world at ZeRO-0, 1 when
    partitioned), so each rank adds its part divided by that."""
    if not grads:  # no parameter got a gradient this step
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # one kernel per device and dtype group
    return torch.stack(norms).square().sum() / replicas  # []


def clip_(grads: list[Tensor], norm: float, max_norm: float) -> None:
    """Scale the gradients in place to norm `max_norm` when above it (DeepSpeed ZeRO-2's formula)."""
    scale = max_norm / (norm + CLIP_EPS)
    if max_norm > 0 and scale < 1.0:
        torch._foreach_mul_(grads, scale)


@dataclass(frozen=True)
class GradientPolicy:
    """What the step does with the final gradients under one engine's settings."""

    zero_stage: int
    clip: float
    """The max norm clipped here; 0 where DeepSpeed clips (or no clip is configured)."""
    replicas: int
    """Ranks holding each gradient: the world at ZeRO-0, 1 when partitioned."""
    measured: bool = True
    """False in fp16, whose gradients carry the loss scale."""
