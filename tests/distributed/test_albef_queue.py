"""ALBEF's queue filled by an all-gather: 2 ranks with half the batch each give the queue and
(averaged) the ITC losses of 1 process with the whole batch, step after step (fp32, rtol 1e-4).
The features come from a fixed projection of fixed inputs, so only the queue and the
all-gather differ between the runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.spawn import run_distributed

STEPS, GLOBAL_BATCH, DIM, QUEUE = 5, 8, 16, 24


def features(step: int):
    g = torch.Generator().manual_seed(step)
    make = lambda: F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g), dim=1)  # noqa: E731
    return make(), make(), make(), make()  # image, text, image_m, text_m [B, D]


def itc_sequence(rank: int, world: int):
    from trainer.distributed import all_gather_rows
    from trainer.models.momentum import FeatureQueues
    from trainer.objectives.albef import itc_loss

    torch.manual_seed(0)  # the same initial queues on every rank
    queues = FeatureQueues(DIM, QUEUE)
    b = GLOBAL_BATCH // world
    mine = slice(rank * b, (rank + 1) * b)
    losses = []
    for step in range(STEPS):
        img, txt, img_m, txt_m = (f[mine] for f in features(step))
        img_m_all, txt_m_all = all_gather_rows(img_m), all_gather_rows(txt_m)
        loss = itc_loss(img, txt, img_m_all, txt_m_all, queues.image_queue, queues.text_queue,
                        torch.tensor(0.07), alpha=0.4, offset=rank * b).loss
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
        queues.push(img_m_all, txt_m_all)  # the trainer pushes the gathered global batch
    # Plain lists: tensors would cross to the parent as shared memory of a process that has exited.
    return losses, queues.image_queue.tolist(), queues.text_queue.tolist(), int(queues.ptr)


def test_two_ranks_with_an_all_gathered_queue_match_one_process():
    (one,) = run_distributed(itc_sequence, 1)
    two = run_distributed(itc_sequence, 2)
    for losses, image_q, text_q, ptr in two:
        assert losses == pytest.approx(one[0], rel=1e-4, abs=0)
        assert image_q == one[1] and text_q == one[2] and ptr == one[3]  # bit-equal queues
    assert one[3] == STEPS * GLOBAL_BATCH % QUEUE  # it wrapped: the oldest features were overwritten
