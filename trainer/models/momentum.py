"""ALBEF's momentum teacher: the EMA of the student's weights and the queues of its features.

Both are state of the run and travel in every checkpoint (trainer/checkpoint.py saves the
teacher module beside the engine's files).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn



@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """`p_m = momentum * p_m + (1 - momentum) * p` for each (student, momentum) module pair,
    parameters in registration order (the pair must be built alike). Student parameters
    partitioned by ZeRO-3 are gathered for the update, one module pair at a time; a bf16
    student updates an fp32 teacher in fp32."""
    for student, teacher in pairs:
        params = list(student.parameters())
        params_m = [p.detach() for p in teacher.parameters()]
        assert len(params) == len(params_m), "student and momentum modules differ"
        with gathered(params):
            source = [p.detach().to(m.dtype) for p, m in zip(params, params_m)]
            torch._foreach_mul_(params_m, momentum)
            torch._foreach_add_(params_m, source, alpha=1.0 - momentum)


def gathered(params: list[nn.Parameter]):
    """Whole copies of ZeRO-3 partitioned parameters inside the block (read only); a no-op
    for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


EMPTY_INDEX = -100
"""The image index of a queue slot no feature has filled yet (ALBEF's `idx_queue` starts at -100)."""


class FeatureQueues(nn.Module):
    """Image and text queues `[D, Q]` of momentum features, filled with each step's global
    batch (all-gathered by the trainer, so every rank holds the same queues); with
    `image_index`, also `idx_queue` [Q]: the image index of each slot (retrieval fine-tuning,
    where queued captions of a batch image are positives too)."""

    def __init__(self, dim: int, size: int, image_index: bool = False) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        index = torch.full((size,), EMPTY_INDEX, dtype=torch.long) if image_index else None
        self.register_buffer("idx_queue", index)  # a None buffer is not saved

    def check_batch(self, global_batch: int) -> None:
        if global_batch <= 0 or self.size % global_batch:
            raise ValueError(f"the queue of {self.size} features must be a multiple of the global batch "
                             f"{global_batch} (ALBEF: 65,536 with batch 512); change one of them")

    @torch.no_grad()
    def push(self, image_feat_m: Tensor, text_feat_m: Tensor, image_index: Optional[Tensor] = None) -> None:
        """Append the global batch's momentum features ([B, D], every rank's rows in stream
        order, the same on all ranks) and, with an index queue, their image indices [B];
        oldest overwritten. Positions wrap around, so a batch shortened by bad samples still
        fits; the write position stays on the device."""
        n = image_feat_m.size(0)
        if n > self.size:
            raise ValueError(f"a global batch of {n} does not fit a queue of {self.size}")
        assert (image_index is None) == (self.idx_queue is None), "image indices go with an index queue"
        cols = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # [B]
        self.image_queue.index_copy_(1, cols, image_feat_m.t().to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text_feat_m.t().to(self.text_queue.dtype))
        if image_index is not None:
            self.idx_queue.index_copy_(0, cols, image_index.to(self.idx_queue.device))
        self.ptr.copy_((self.ptr + n) % self.size)
