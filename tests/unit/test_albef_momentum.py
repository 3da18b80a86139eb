"""ALBEF's momentum teacher: EMA of the weights and the feature queues (one process here;
the all-gathered push of several ranks: tests/distributed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.models.momentum import FeatureQueues, ema_update


def test_ema_update_is_the_formula_for_every_parameter():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update([(student, teacher)], 0.995)
    for p, p_m, old in zip(student.parameters(), teacher.parameters(), before):
        # (the add may fuse multiply and add: equal to rounding, not bit for bit)
        torch.testing.assert_close(p_m.detach(), old * 0.995 + p.detach() * (1 - 0.995), rtol=1e-6, atol=1e-7)


def test_queue_push_writes_in_order_and_wraps_without_host_sync():
    torch.manual_seed(0)
    queues = FeatureQueues(dim=4, size=6)
    assert torch.allclose(queues.image_queue.norm(dim=0), torch.ones(6))
    batches = [torch.randn(2, 4) for _ in range(4)]
    for k, b in enumerate(batches):
        queues.push(b, -b)
        assert int(queues.ptr) == (2 * (k + 1)) % 6
    # After 4 pushes of 2 into 6 slots: slots 0-1 hold batch 3, 2-3 batch 1, 4-5 batch 2.
    for slots, b in ((slice(0, 2), batches[3]), (slice(2, 4), batches[1]), (slice(4, 6), batches[2])):
        assert torch.equal(queues.image_queue[:, slots], b.t())
        assert torch.equal(queues.text_queue[:, slots], -b.t())
    assert set(queues.state_dict()) == {"image_queue", "text_queue", "ptr"}  # in every checkpoint


def test_queue_size_must_divide_by_the_global_batch():
    queues = FeatureQueues(dim=4, size=10)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        queues.check_batch(4)
    queues.check_batch(5)


def test_a_batch_shortened_by_bad_samples_wraps_around():
    queues = FeatureQueues(dim=2, size=4)
    queues.push(torch.ones(3, 2), torch.ones(3, 2))
    queues.push(torch.full((3, 2), 2.0), torch.full((3, 2), 2.0))  # slots 3, 0, 1
    assert queues.image_queue[0].tolist() == [2.0, 2.0, 1.0, 2.0] and int(queues.ptr) == 2
    with pytest.raises(ValueError, match="does not fit a queue of 4"):
        queues.push(torch.ones(5, 2), torch.ones(5, 2))


def test_ema_of_a_bf16_student_into_an_fp32_teacher():
    student, teacher = nn.Linear(3, 3).to(torch.bfloat16), nn.Linear(3, 3)
    before = teacher.weight.detach().clone()
    ema_update([(student, teacher)], 0.9)
    assert teacher.weight.dtype == torch.float32
    want = before * 0.9 + student.weight.detach().float() * 0.1
    torch.testing.assert_close(teacher.weight.detach(), want, rtol=1e-6, atol=1e-7)
