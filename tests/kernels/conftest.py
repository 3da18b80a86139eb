"""Kernel tests run each Triton kernel on CPU through Triton's interpreter, and on CUDA when present.

`kernel_device` sets VLPT_KERNELS=on, so a test fails loudly if the dispatch would
quietly fall back to the reference it is compared with.
"""
from __future__ import annotations

import pytest
import torch

from kernels.triton_jit import INTERPRETED


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request, monkeypatch) -> torch.device:
    if request.param == "cuda" and (INTERPRETED or not torch.cuda.is_available()):
        pytest.skip("needs CUDA and Triton's compiler (TRITON_INTERPRET unset)")
    if request.param == "cpu" and not INTERPRETED:
        pytest.skip("needs Triton's interpreter: TRITON_INTERPRET=1 before Triton is imported")
    monkeypatch.setenv("VLPT_KERNELS", "on")
    return torch.device(request.param)


@pytest.fixture
def reference_only(monkeypatch):
    """Run the dispatching functions on their torch references."""
    monkeypatch.setenv("VLPT_KERNELS", "off")


def ragged_pads(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B] lengths -> [B, n] bool, True at padding."""
    return torch.arange(n, device=lengths.device)[None, :] >= lengths[:, None]


def odd_lengths(b: int, n: int, seed: int) -> torch.Tensor:
    """Ragged lengths in [0, n] for B examples: the first full, the second all padding (B > 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n + 1, (b,), generator=g)
    lengths[0] = n
    if b > 1:
        lengths[1] = 0
    return lengths
