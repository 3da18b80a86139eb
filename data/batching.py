"""How a reader cuts its samples into batches: fixed sizes or token budgets.

Fixed sizes (`batch_schedule`): every reader of an epoch makes the same number
of batches, so ranks never wait on each other at an epoch's end, and every
sample is used once: readers hold m or m+1 samples, all but the last two
batches are full and the last two share the rest.

Token budget (`token_buckets`, UNITER's TokenBucketSampler): a shuffled block
is sorted by length, longest first, and cut into batches grown 8 samples at a
time while `longest × size <= budget`, so padding is small and sizes suit
tensor cores.
"""
from __future__ import annotations

from typing import Sequence

SIZE_MULTIPLE = 8


def batches_per_epoch(most_samples: int, batch_size: int) -> int:
    """Batches every reader makes in an epoch whose fullest reader holds `most_samples`."""
    return -(-most_samples // batch_size)


def batch_schedule(n_samples: int, n_batches: int, batch_size: int) -> list[int]:
    """Sizes of the `n_batches` batches of a reader holding `n_samples`.

    Full batches, then the remainder split into two near-equal batches, so a reader
    with one sample fewer than the fullest still makes `n_batches`. Needs
    (n_batches - 1) * batch_size <= n_samples <= n_batches * batch_size; with
    batch_size 1 a reader one sample short makes one batch fewer.
    """
    assert 0 <= n_samples <= n_batches * batch_size, (n_samples, n_batches, batch_size)
    if n_batches <= 1:
        return [n_samples] if n_samples else []
    full = n_batches - 2
    rest = n_samples - full * batch_size
    assert rest >= 0, (n_samples, n_batches, batch_size)
    tail = [s for s in (rest - rest // 2, rest // 2) if s > 0]
    return [batch_size] * full + tail


def token_buckets(lengths: Sequence[int], budget: int, multiple: int = SIZE_MULTIPLE) -> list[list[int]]:
    """Index lists of batches over samples of the given lengths (sorted longest first).

    Each batch holds a multiple of `multiple` samples and `max length × size <= budget`.
    The `len(lengths) % multiple` shortest samples are left out (the caller keeps
    them for later); ValueError when even `multiple` samples of the longest do not fit.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep block order
    usable = len(order) - len(order) % multiple
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for start in range(0, usable, multiple):
        chunk = order[start:start + multiple]
        chunk_longest = max(lengths[i] for i in chunk)
        if not current and chunk_longest * multiple > budget:
            raise ValueError(
                f"data.uniter.token_budget={budget} is too small: {multiple} samples of {chunk_longest} "
                f"tokens (text + regions) need {chunk_longest * multiple}; raise the budget or "
                f"lower data.max_txt_len / the region count")
        if current and max(longest, chunk_longest) * (len(current) + multiple) > budget:
            batches.append(current)
            current, longest = [], 0
        current.extend(chunk)
        longest = max(longest, chunk_longest)
    if current:
        batches.append(current)
    return batches


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """Share of padded slots when each batch is padded to its longest sample."""
    slots = sum(max(b) * len(b) for b in batches if b)
    used = sum(sum(b) for b in batches)
    return 1.0 - used / slots if slots else 0.0
