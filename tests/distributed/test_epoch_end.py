"""2 gloo ranks x 2 DataLoader workers over 7 unequal shards: one epoch, a collective per
batch (as a training step has), every key once, and both ranks reach the end together."""
import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_distributed
from tests.loader_util import UNEQUAL_SIZES, make_loader, spec_for, write_sized_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _epoch_with_collectives(rank: int, world: int, data: str) -> dict:
    spec = spec_for(data, n_streams=world, parts=2, epochs=1)
    keys, batches = [], 0
    for batch in make_loader(spec, [rank], workers=2):
        keys += batch["keys"]
        count = torch.tensor([1.0])
        dist.all_reduce(count)  # a rank with an extra batch would wait here forever
        assert count.item() == world
        batches += 1
    dist.barrier()
    return {"keys": keys, "batches": batches}


def test_two_ranks_two_workers_epoch_ends_together(tmp_path):
    data = write_sized_shards(tmp_path, UNEQUAL_SIZES)
    results = run_distributed(_epoch_with_collectives, 2, str(data))
    keys = [k for r in results for k in r["keys"]]
    assert len(keys) == sum(UNEQUAL_SIZES) and len(set(keys)) == len(keys)
    assert results[0]["batches"] == results[1]["batches"] > 0
