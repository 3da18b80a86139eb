"""Masked region modelling (UNITER; docs/models.md, "Masked region modelling"): MRFR, MRC, MRC-kl.

Conditional masking: `collate_mrm` zeroed the features of the masked regions
(the model adds `mask_embedding.weight[1]` there via `img_masks`) and left the
text whole. All three losses take the head outputs at the N masked regions
(N = `n_items`, the masked regions of the batch: trainer/recipes/uniter_tasks.py
gathers them) and compute in fp32.

Normalisation. The trainer divides `loss_sum` (and every stat) by the number of
terms N of the whole step, so `loss_sum` is chosen such that `loss_sum / N`
equals UNITER's elementwise mean exactly:

- MRFR: UNITER's loss is `mse(pred, target, reduction='none').mean()` over
  N x img_dim elements; `loss_sum = se.sum() / img_dim`, hence
  `loss_sum / N = se.sum() / (N * img_dim)` = UNITER's mean.
- MRC-kl: UNITER's loss is `kl_div(log_softmax(z), soft, reduction='none').mean()`
  over N x K elements (K = img_label_dim); `loss_sum = kl.sum() / K`, hence
  `loss_sum / N = kl.sum() / (N * K)` = UNITER's mean.
- MRC: plain CE per region, `loss_sum` = CE summed over the N regions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.objectives.base import TaskResult


def mrc_targets(soft: Tensor) -> Tensor:
    """Hard MRC targets [N] from soft labels [N, K]: argmax over classes 1.. (0 = background never)."""
    return soft[:, 1:].argmax(-1) + 1


def mrfr_loss(pred: Tensor, target: Tensor) -> TaskResult:
    """Masked region feature regression: pred [N, D] (fp32) regressed features, target [N, D].

    stats (sums over the N masked regions; the trainer divides by N):
      loss            same as the loss: / N gives the MSE per feature element (UNITER's loss)
      mse_per_region  sum over regions of the squared error summed over img_dim:
                      / N gives the squared L2 error per region ("MRFR MSE per region"
                      in validation); it equals img_dim * loss.
    """
    target = target.to(device=pred.device, dtype=torch.float32)  # [N, D]
    se = F.mse_loss(pred, target, reduction="none")  # [N, D]
    se_sum = se.sum()
    loss_sum = se_sum / se.size(-1)
    return TaskResult({"loss": loss_sum}, {"loss": loss_sum.detach(), "mse_per_region": se_sum.detach()})


def mrc_loss(logits: Tensor, soft: Tensor) -> TaskResult:
    """Masked region classification: logits [N, K] (fp32), CE against argmax(soft[:, 1:]) + 1.

    stats: loss (CE sum), acc (count of argmax(logits[:, 1:]) == argmax(soft[:, 1:]):
    as UNITER's validation, background is excluded on both sides).
    """
    targets = mrc_targets(soft.to(logits.device))  # [N]
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits[:, 1:].argmax(-1) + 1 == targets).sum().float()
    return TaskResult({"loss": loss_sum}, {"loss": loss_sum.detach(), "acc": correct})


def mrc_kl_loss(logits: Tensor, soft: Tensor) -> TaskResult:
    """Masked region classification with KL divergence to the detector's soft labels [N, K].

    stats (sums over the N masked regions; the trainer divides by N):
      loss  same as the loss: / N gives UNITER's elementwise-mean KL loss
      kl    KL(soft || softmax(z)) summed over classes and regions: / N gives the
            mean KL divergence per region; it equals K * loss
      acc   count of argmax(logits) == argmax(soft), background included (UNITER's
            `compute_accuracy_for_soft_targets`)
    """
    soft = soft.to(device=logits.device, dtype=torch.float32)  # [N, K]
    kl = F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="none")  # [N, K]
    kl_sum = kl.sum()
    loss_sum = kl_sum / kl.size(-1)
    correct = (logits.argmax(-1) == soft.argmax(-1)).sum().float()
    return TaskResult({"loss": loss_sum}, {"loss": loss_sum.detach(), "kl": kl_sum.detach(), "acc": correct})
