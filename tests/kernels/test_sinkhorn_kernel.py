"""Fused Sinkhorn kernel vs POT's `ot.sinkhorn` and vs its torch reference (`kernels.sinkhorn`)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kernels.sinkhorn import sinkhorn, sinkhorn_reference
from tests.kernels.conftest import odd_lengths, ragged_pads

ot = pytest.importorskip("ot")


def pot_sinkhorn(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, n_iter: int) -> np.ndarray:
    """POT's plan on one unpadded problem, in fp64, all `n_iter` iterations (stopThr=0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": stopThr=0 runs every iteration
        return ot.sinkhorn(a.double().numpy(), b.double().numpy(), M.double().numpy(), reg,
                           method="sinkhorn", numItermax=n_iter, stopThr=0)


def ragged_marginals(b: int, n: int, m: int, seed: int):
    """fp32 marginals with zeros at pads (example 0 full, 1 without sources, 2 without targets)
    and costs in [0, 1] with NaN at pad pairs (must never leak)."""
    g = torch.Generator().manual_seed(seed)
    n_len, m_len = odd_lengths(b, n, seed), odd_lengths(b, m, seed + 1)
    if b > 2:
        m_len[1], m_len[2] = m, 0
    a = (torch.rand(b, n, generator=g) + 0.1) * ~ragged_pads(n_len, n)
    bb = (torch.rand(b, m, generator=g) + 0.1) * ~ragged_pads(m_len, m)
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    bb = bb / bb.sum(1, keepdim=True).clamp_min(1e-12)
    M = torch.rand(b, n, m, generator=g)
    M = M.masked_fill((a == 0)[:, :, None] | (bb == 0)[:, None, :], float("nan"))
    return a, bb, M, n_len, m_len


@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("n", [1, 7, 60])
@pytest.mark.parametrize("m", [1, 36, 100])
def test_sinkhorn_kernel_matches_pot_on_odd_shapes(kernel_device, b, n, m):
    reg, n_iter = 0.1, 50
    a, bb, M, n_len, m_len = ragged_marginals(b, n, m, seed=b * 1000 + n * 10 + m)
    P, d = sinkhorn(a.to(kernel_device), bb.to(kernel_device), M.to(kernel_device), reg, n_iter)
    assert P.dtype == torch.float32 and P.shape == (b, n, m) and torch.isfinite(P).all()
    P, d = P.cpu(), d.cpu()
    for e in range(b):
        ne, me = int(n_len[e]), int(m_len[e])
        if ne == 0 or me == 0:
            assert (P[e] == 0).all() and d[e] == 0  # no valid pair: no plan
            continue
        ref = torch.from_numpy(pot_sinkhorn(a[e, :ne], bb[e, :me], M[e, :ne, :me], reg, n_iter))
        torch.testing.assert_close(P[e, :ne, :me].double(), ref, atol=1e-5, rtol=1e-5)
        assert (P[e, ne:] == 0).all() and (P[e, :, me:] == 0).all()
        torch.testing.assert_close(d[e].double(), (ref * M[e, :ne, :me].double()).sum(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reg,n_iter", [(0.05, 200), (1.0, 1), (0.02, 20)])
def test_sinkhorn_kernel_equals_reference_forward_and_backward(kernel_device, reg, n_iter):
    a, bb, M, _, _ = ragged_marginals(5, 11, 23, seed=int(reg * 100) + n_iter)
    a, bb = a.to(kernel_device), bb.to(kernel_device)
    M = M.to(kernel_device).requires_grad_()
    P, d = sinkhorn(a, bb, M, reg, n_iter)
    M_ref = M.detach().clone().requires_grad_()
    P_ref, d_ref = sinkhorn_reference(a, bb, M_ref, reg, n_iter)
    torch.testing.assert_close(P, P_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=1e-5)
    weights = torch.linspace(-1, 2, d.numel(), device=d.device)
    (d * weights).sum().backward()
    (d_ref * weights).sum().backward()
    torch.testing.assert_close(M.grad, M_ref.grad, atol=1e-5, rtol=1e-5)  # = weight * P
    torch.testing.assert_close(M.grad, weights[:, None, None] * P, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_kernel_half_inputs(kernel_device, dtype):
    a, bb, M, _, _ = ragged_marginals(4, 9, 17, seed=11)
    a, bb, M = (t.to(kernel_device, dtype) for t in (a, bb, M))
    P, d = sinkhorn(a, bb, M, 0.1, 50)
    P_ref, d_ref = sinkhorn_reference(a, bb, M, 0.1, 50)  # casts the same half values up
    assert P.dtype == torch.float32
    torch.testing.assert_close(P, P_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=1e-5)
