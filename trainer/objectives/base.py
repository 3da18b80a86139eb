"""The value every objective returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskResult:
    loss_sum: torch.Tensor
    """Scalar: sum of the per-term losses of this micro-batch (the gradient flows through it)."""
    stats: dict[str, torch.Tensor]
    """Detached scalar sums (e.g. `loss`, `acc`); divided by the term count when reported."""
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Own denominators for stats that do not average over the batch's terms
    (e.g. `ot_pos` over positive pairs only); absent stats use `n_items`."""
