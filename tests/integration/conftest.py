"""Fixtures shared by the in-process engine tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny fp32 matmuls: one intra-op thread is fastest, and 2 threads on a busy 2-core
    machine spin-wait each other into a 100x slowdown (as `run_vlpt` subprocesses, which
    get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from data.tokenizer import load_tokenizer
    from data.vocab import DEMO_VOCAB_PATH

    return load_tokenizer(DEMO_VOCAB_PATH)
