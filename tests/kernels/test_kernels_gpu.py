"""GPU only: the kernels' forward and backward make no host synchronisation."""
from __future__ import annotations

import pytest
import torch

from kernels.masked_gather import masked_gather
from kernels.ot import ot_distance, wra_loss
from kernels.sinkhorn import sinkhorn
from kernels.triton_jit import INTERPRETED

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and Triton's compiler")]


@pytest.fixture
def sync_is_an_error(monkeypatch):
    monkeypatch.setenv("VLPT_KERNELS", "on")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    yield
    torch.cuda.set_sync_debug_mode("default")


def test_no_host_sync_in_wra_and_masked_gather(sync_is_an_error):
    dev = torch.device("cuda")
    b, nt, ni, h = 32, 60, 100, 768
    txt = torch.randn(b, nt, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    img = torch.randn(b, ni, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.arange(b, device=dev)
    txt_pad = torch.arange(nt, device=dev)[None] >= (nt - lengths % 7)[:, None]  # [B, Nt]
    img_pad = torch.arange(ni, device=dev)[None] >= (ni - lengths % 13)[:, None]  # [B, Ni]
    targets = (lengths % 2).long()
    d = ot_distance(txt.float(), img.float(), txt_pad, img_pad)
    ot_loss = wra_loss(d, targets)[0]
    index = torch.arange(0, b * nt, 7, device=dev)  # as collate would ship it
    gathered = masked_gather(txt, index)  # [N, H]
    (ot_loss + gathered.float().square().mean()).backward()
    a = torch.full((b, nt), 1 / nt, device=dev)
    bb = torch.full((b, ni), 1 / ni, device=dev)
    M = torch.rand(b, nt, ni, device=dev, requires_grad=True)
    sinkhorn(a, bb, M, 0.1, 50)[1].sum().backward()
    torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(txt.grad.float()).all() and torch.isfinite(M.grad).all()
