"""Masked language modelling (UNITER, DESIGN §3): CE over the selected word pieces.

Conditional masking: the collate function masked text only, so the image the
model sees here is complete.
"""
from __future__ import annotations

import torch.nn.functional as F

from kernels import masked_gather
from trainer.objectives.base import TaskResult


def mlm_objective(model, batch: dict) -> TaskResult:
    hidden = model.encode(batch)  # [B, L, H]
    masked = masked_gather(hidden, batch["mlm_index"])  # [N, H]
    logits = model.mlm_logits(masked).float()  # [N, V]; CE in fp32 under bf16/fp16
    targets = batch["mlm_targets"]  # [N]
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return TaskResult(loss_sum, {"loss": loss_sum.detach(), "acc": correct.float()})
