"""Image-text matching (UNITER, DESIGN §3): 2-way CE on the pooled [CLS] state.

Negatives were made in collate by swapping in an image of a different
`image_id` with probability 0.5; target 1 means the pair matches.
"""
from __future__ import annotations

import torch.nn.functional as F

from trainer.objectives.base import TaskResult


def itm_objective(model, batch: dict) -> TaskResult:
    hidden = model.encode(batch)  # [B, L, H]
    logits = model.itm_logits(hidden).float()  # [B, 2]
    targets = batch["itm_targets"]  # [B]
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return TaskResult(loss_sum, {"loss": loss_sum.detach(), "acc": correct.float()})
