"""Fused masked gather (forward gather, backward scatter) vs the torch reference and `hidden[mask]`."""
from __future__ import annotations

import pytest
import torch

from kernels.masked_gather import masked_gather, masked_gather_reference


def masked_positions(b: int, length: int, seed: int, p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """A random mask [B, L] and its flat positions [N] as collate computes them (on the host)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, length, generator=g) < p
    mask[0, length // 2] = True  # at least one
    return mask, mask.flatten().nonzero().squeeze(1)


@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("length", [1, 7, 60])
@pytest.mark.parametrize("h", [1, 37, 300])
def test_masked_gather_kernel_equals_reference_forward_backward(kernel_device, b, length, h):
    mask, index = masked_positions(b, length, seed=b * 1000 + length * 10 + h)
    g = torch.Generator().manual_seed(h)
    hidden = torch.randn(b, length, h, generator=g).to(kernel_device).requires_grad_()
    index = index.to(kernel_device)
    out = masked_gather(hidden, index)
    torch.testing.assert_close(out, hidden[mask.to(kernel_device)], atol=0, rtol=0)
    upstream = torch.randn(out.shape, generator=g).to(kernel_device)
    out.backward(upstream)
    ref_hidden = hidden.detach().clone().requires_grad_()
    masked_gather_reference(ref_hidden, index).backward(upstream)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=0, rtol=0)
    assert (hidden.grad[~mask.to(kernel_device)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_masked_gather_kernel_dtypes(kernel_device, dtype, index_dtype):
    mask, index = masked_positions(4, 25, seed=3, p=0.3)
    hidden = torch.randn(4, 25, 48).to(kernel_device, dtype).requires_grad_()
    out = masked_gather(hidden, index.to(kernel_device, index_dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, hidden[mask.to(kernel_device)], atol=0, rtol=0)
    out.float().sum().backward()
    assert hidden.grad.dtype == dtype
    torch.testing.assert_close(hidden.grad, mask.to(kernel_device, dtype)[:, :, None].expand_as(hidden),
                               atol=0, rtol=0)


def test_masked_gather_kernel_no_positions(kernel_device):
    hidden = torch.randn(2, 5, 8, device=kernel_device, requires_grad=True)
    out = masked_gather(hidden, torch.zeros(0, dtype=torch.long, device=kernel_device))
    assert out.shape == (0, 8)
    out.sum().backward()
    assert (hidden.grad == 0).all()


def test_masked_gather_kernel_non_contiguous_hidden(kernel_device):
    mask, index = masked_positions(3, 10, seed=4, p=0.4)
    base = torch.randn(10, 3, 16, device=kernel_device)
    hidden = base.transpose(0, 1)  # [3, 10, 16], not contiguous
    out = masked_gather(hidden, index.to(kernel_device))
    torch.testing.assert_close(out, hidden[mask.to(kernel_device)], atol=0, rtol=0)
