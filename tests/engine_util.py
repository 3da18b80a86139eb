"""Helpers for tests that drive the real engine with prepared batches."""
from __future__ import annotations


def demo_region_samples(data_dir, tok, n: int) -> list:
    """The first `n` samples of the test shards' training split, decoded (all must be good)."""
    from data.shards import decode_region_sample, iter_shard, read_manifest

    samples = []
    for shard in read_manifest(data_dir / "train").shards:
        for raw in iter_shard(shard):
            sample, reason = decode_region_sample(raw, tok, max_txt_len=60, img_dim=16, label_dim=9)
            assert reason is None, reason
            samples.append(sample)
        if len(samples) >= n:
            break
    assert len(samples) >= n, f"the test shards hold {len(samples)} samples, {n} wanted"
    return samples[:n]


class ListLoader:
    """Stands in for ResumableTaskLoader: gives the prepared micro-batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
