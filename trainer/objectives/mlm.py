"""Masked language modelling (UNITER; docs/models.md, "MLM"): CE over the selected word pieces."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trainer.objectives.base import TaskResult


def mlm_loss(logits: Tensor, targets: Tensor) -> TaskResult:
    """logits [N, V] (fp32) at the N masked positions, targets [N] original ids -> summed CE."""
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return TaskResult({"loss": loss_sum}, {"loss": loss_sum.detach(), "acc": correct.float()})
