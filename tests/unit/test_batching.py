"""Batch schedules (equal counts, every sample once) and token buckets (budget, multiples of 8)."""
import numpy as np
import pytest

from data.batching import batch_schedule, batches_per_epoch, padding_fraction, token_buckets


@pytest.mark.parametrize("total,readers,batch", [(173, 4, 8), (64, 4, 8), (65, 4, 8), (100, 3, 32), (9, 2, 4)])
def test_schedule_uses_every_sample_with_equal_counts(total, readers, batch):
    shares = [(r + 1) * total // readers - r * total // readers for r in range(readers)]
    n = batches_per_epoch(max(shares), batch)
    schedules = [batch_schedule(m, n, batch) for m in shares]
    assert [sum(s) for s in schedules] == shares
    assert {len(s) for s in schedules} == {n}
    assert all(0 < size <= batch for s in schedules for size in s)


def test_token_buckets_fit_the_budget_in_multiples_of_8():
    lengths = list(np.random.default_rng(0).integers(10, 90, size=1003))
    batches = token_buckets(lengths, budget=2048)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used)) == 1000  # only the 1003 % 8 = 3 shortest wait
    for b in batches:
        assert len(b) % 8 == 0 and max(lengths[i] for i in b) * len(b) <= 2048
    left = set(range(1003)) - set(used)
    assert max(lengths[i] for i in left) <= min(lengths[i] for i in used)


def test_token_buckets_pad_less_than_fixed_batches():
    lengths = list(np.random.default_rng(1).integers(10, 90, size=512))
    buckets = [[lengths[i] for i in b] for b in token_buckets(lengths, budget=2048)]
    fixed = [lengths[i:i + 32] for i in range(0, 512, 32)]
    assert padding_fraction(buckets) < padding_fraction(fixed) / 4


def test_too_small_budget_is_an_actionable_error():
    with pytest.raises(ValueError, match="token_budget=100 is too small"):
        token_buckets([20] * 16, budget=100)
