"""Fused IPOT kernel vs its torch reference (`kernels.ipot`), forward and backward."""
from __future__ import annotations

import pytest
import torch

from kernels.ipot import ipot, ipot_reference
from kernels.ot import cosine_cost, ot_distance
from tests.kernels.conftest import odd_lengths, ragged_pads


def ragged_problem(b: int, nt: int, ni: int, seed: int, device, dtype=torch.float32):
    """Cosine-like costs in [0, 2] with NaN at pad pairs (must never leak), ragged pads.

    Example 0 is full; with B > 1 example 1 has no text and, with B > 2, example 2 no regions.
    """
    g = torch.Generator().manual_seed(seed)
    txt_len = odd_lengths(b, nt, seed)
    img_len = odd_lengths(b, ni, seed + 1)
    if b > 2:
        img_len[1], img_len[2] = ni, 0
    txt_pad, img_pad = ragged_pads(txt_len, nt), ragged_pads(img_len, ni)
    C = 2 * torch.rand(b, nt, ni, generator=g)
    C = C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], float("nan"))
    return C.to(device=device, dtype=dtype), txt_pad.to(device), img_pad.to(device)


def assert_matches_reference(C, txt_pad, img_pad, atol=1e-5, **kw):
    C = C.detach().requires_grad_()
    T, d = ipot(C, txt_pad, img_pad, **kw)
    C_ref = C.detach().clone().requires_grad_()
    T_ref, d_ref = ipot_reference(C_ref, txt_pad, img_pad, **kw)
    assert T.shape == T_ref.shape and T.dtype == torch.float32 and d.dtype == torch.float32
    assert not T.requires_grad and torch.isfinite(T).all() and torch.isfinite(d).all()
    torch.testing.assert_close(T, T_ref, atol=atol, rtol=0)
    torch.testing.assert_close(d, d_ref, atol=atol, rtol=0)
    weights = torch.linspace(-1, 2, d.numel(), device=d.device)  # a non-uniform upstream gradient
    (d * weights).sum().backward()
    (d_ref * weights).sum().backward()
    assert C.grad.dtype == C.dtype
    torch.testing.assert_close(C.grad.float(), C_ref.grad.float(), atol=atol, rtol=0)
    joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]
    assert (T.transpose(1, 2)[joint_pad] == 0).all() and (C.grad[joint_pad] == 0).all()
    return T, d


@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("nt", [1, 7, 60])
@pytest.mark.parametrize("ni", [1, 36, 100])
def test_ipot_kernel_equals_reference_on_odd_shapes(kernel_device, b, nt, ni):
    C, txt_pad, img_pad = ragged_problem(b, nt, ni, seed=b * 1000 + nt * 10 + ni, device=kernel_device)
    T, d = assert_matches_reference(C, txt_pad, img_pad)
    if b > 1:
        assert (T[1] == 0).all() and d[1] == 0  # all text padding: no plan, no distance
    if b > 2:
        assert (T[2] == 0).all() and d[2] == 0  # all regions padding


@pytest.mark.parametrize("beta,iterations,k", [(0.3, 20, 2), (0.1, 200, 1), (1.0, 1, 3)])
def test_ipot_kernel_other_hyperparameters(kernel_device, beta, iterations, k):
    C, txt_pad, img_pad = ragged_problem(5, 13, 29, seed=3, device=kernel_device)
    assert_matches_reference(C, txt_pad, img_pad, beta=beta, iterations=iterations, k=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ipot_kernel_half_inputs_accumulate_in_fp32(kernel_device, dtype):
    """Half costs are loaded as they are and computed in fp32: same result as the reference
    (which casts them up), an fp32 plan and distance, and a gradient in the input dtype."""
    C, txt_pad, img_pad = ragged_problem(4, 22, 37, seed=4, device=kernel_device, dtype=dtype)
    assert_matches_reference(C, txt_pad, img_pad, atol=2e-5)


def test_ipot_kernel_reads_strided_cost(kernel_device):
    C, txt_pad, img_pad = ragged_problem(3, 9, 14, seed=5, device=kernel_device)
    strided = C.transpose(1, 2).contiguous().transpose(1, 2)  # same values, Ni-major strides
    assert not strided.is_contiguous()
    T, d = ipot(strided, txt_pad, img_pad)
    T_ref, d_ref = ipot_reference(C, txt_pad, img_pad)
    torch.testing.assert_close(T, T_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=0)


def test_ipot_kernel_batch_of_zero(kernel_device):
    C = torch.zeros(0, 4, 5, device=kernel_device)
    T, d = ipot(C, torch.zeros(0, 4, dtype=torch.bool, device=kernel_device),
                torch.zeros(0, 5, dtype=torch.bool, device=kernel_device))
    assert T.shape == (0, 5, 4) and d.shape == (0,)


def test_ot_distance_through_the_kernel_equals_reference(kernel_device, monkeypatch):
    """The WRA path end to end: cosine cost -> dispatch -> distance; gradients to both inputs."""
    g = torch.Generator().manual_seed(6)
    b, nt, ni, h = 6, 20, 36, 32
    txt_pad = ragged_pads(odd_lengths(b, nt, 6), nt).to(kernel_device)
    img_pad = ragged_pads(odd_lengths(b, ni, 7), ni).to(kernel_device)
    txt = torch.randn(b, nt, h, generator=g).to(kernel_device).requires_grad_()
    img = torch.randn(b, ni, h, generator=g).to(kernel_device).requires_grad_()
    d = ot_distance(txt, img, txt_pad, img_pad)
    d.sum().backward()
    monkeypatch.setenv("VLPT_KERNELS", "off")
    t2, i2 = txt.detach().clone().requires_grad_(), img.detach().clone().requires_grad_()
    d_ref = ot_distance(t2, i2, txt_pad, img_pad)
    d_ref.sum().backward()
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.grad, t2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(img.grad, i2.grad, atol=1e-5, rtol=0)
    assert cosine_cost(txt, img).shape == (b, nt, ni)
