"""The value every objective returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskResult:
    losses: dict[str, torch.Tensor]
    """Scalar sums over this micro-batch's loss terms, with gradient, by loss name (UNITER: one,
    "loss"; ALBEF: "itc", "itm", "mlm"). The step divides each by its own term count over the
    whole step and all ranks (the recipe's `term_counts`)."""
    stats: dict[str, torch.Tensor]
    """Detached scalar sums (e.g. `loss`, `acc`); divided by the term count when reported."""
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Own denominators for stats that do not average over the batch's terms
    (e.g. `ot_pos` over positive pairs only); absent stats use `n_items`."""
