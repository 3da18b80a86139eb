"""The value every objective returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskResult:
    loss_sum: torch.Tensor
    """Scalar: sum of the per-term losses of this micro-batch (the gradient flows through it)."""
    stats: dict[str, torch.Tensor]
    """Detached scalar sums (e.g. `loss`, `correct`); divided by the term count when reported."""
