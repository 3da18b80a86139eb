"""Retrieval scoring split over gloo ranks (queries dealt out rank-strided, results gathered) gives the
score matrices and recalls of 1 rank, on every rank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.pixels import PixelConfig
from tests.distributed.spawn import run_distributed
from tests.unit.test_retrieval import TableEngine, retrieval_set
from trainer.retrieval import retrieval_scores


def score(rank: int, world: int, k: int) -> tuple:
    found = retrieval_scores(TableEngine(), retrieval_set(), PixelConfig(image_size=8), k=k, batch_size=5,
                             device=torch.device("cpu"), rank=rank, world=world)
    return found.metrics, found.t2i.numpy(), found.i2t.numpy()


@pytest.mark.parametrize("world", [2, 5])  # 5 does not divide the 24 texts or 12 images: padded queries
def test_ranks_score_as_one(world):
    one = score(0, 1, 4)
    for metrics, t2i, i2t in run_distributed(score, world, 4):
        assert metrics == one[0]
        np.testing.assert_array_equal(t2i, one[1])
        np.testing.assert_array_equal(i2t, one[2])
