"""ALBEF's momentum teacher: the EMA of the student's weights and the queues of its features.

Both are state of the run: the queues are buffers of this module, the momentum weights
parameters of modules kept out of the optimizer, so both travel in every checkpoint.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.distributed import all_gather_rows


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """`p_m = momentum * p_m + (1 - momentum) * p` for each (student, momentum) module pair,
    parameters in registration order (the pair must be built alike)."""
    for student, teacher in pairs:
        params = [p.detach() for p in student.parameters()]
        params_m = [p.detach() for p in teacher.parameters()]
        assert len(params) == len(params_m), "student and momentum modules differ"
        torch._foreach_mul_(params_m, momentum)
        torch._foreach_add_(params_m, params, alpha=1.0 - momentum)


class FeatureQueues(nn.Module):
    """Image and text queues `[D, Q]` of momentum features, filled in rank order from an
    all-gather of every rank's batch; the write position stays on the device (no host sync)."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        if global_batch <= 0 or self.size % global_batch:
            raise ValueError(f"the queue of {self.size} features must be a multiple of the global batch "
                             f"{global_batch} (ALBEF: 65,536 with batch 512); change one of them")

    @torch.no_grad()
    def push(self, image_feat_m: Tensor, text_feat_m: Tensor) -> None:
        """Append every rank's momentum features ([b, D] here), oldest overwritten."""
        image = all_gather_rows(image_feat_m)  # [B, D]
        text = all_gather_rows(text_feat_m)  # [B, D]
        n = image.size(0)
        self.check_batch(n)
        cols = self.ptr + torch.arange(n, device=self.ptr.device)  # [B], never past the end: Q % B == 0
        self.image_queue.index_copy_(1, cols, image.t().to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text.t().to(self.text_queue.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)
