"""Pure-torch OT references (kernels/ot.py) vs POT and a scalar re-implementation of UNITER IPOT."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

ot = pytest.importorskip("ot")

from kernels.ipot import ipot_plan  # noqa: E402
from kernels.ot import cosine_cost, ot_distance, wra_loss  # noqa: E402
from kernels.sinkhorn import sinkhorn_plan  # noqa: E402

# B = 4 ragged batch: example 0 fully valid, the others padded on one or both sides.
NT, NI = 7, 9
TXT_LEN = [7, 4, 7, 2]
IMG_LEN = [9, 9, 3, 5]


def pads(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]  # [B, n] True at pad


def ragged_cost(seed: int, dtype=torch.float64, low=0.0, high=2.0):
    """Random costs in [low, high] with garbage at pad pairs (callers must not depend on it)."""
    g = torch.Generator().manual_seed(seed)
    C = low + (high - low) * torch.rand(len(TXT_LEN), NT, NI, generator=g, dtype=dtype)
    txt_pad, img_pad = pads(TXT_LEN, NT), pads(IMG_LEN, NI)
    C = C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 7.0)
    return C, txt_pad, img_pad


def uniter_ipot_scalar(C: list[list[float]], beta: float, iterations: int, k: int):
    """UNITER's IPOT on one unpadded example, plain Python floats: C [n_x][n_y] -> T [n_y][n_x]."""
    nx, ny = len(C), len(C[0])
    sigma = [1.0 / nx] * nx
    T = [[1.0] * nx for _ in range(ny)]
    A = [[math.exp(-C[j][i] / beta) for j in range(nx)] for i in range(ny)]
    for _ in range(iterations):
        Q = [[A[i][j] * T[i][j] for j in range(nx)] for i in range(ny)]
        for _ in range(k):
            delta = [1.0 / (ny * sum(Q[i][j] * sigma[j] for j in range(nx))) for i in range(ny)]
            sigma = [1.0 / (nx * sum(delta[i] * Q[i][j] for i in range(ny))) for j in range(nx)]
        T = [[delta[i] * Q[i][j] * sigma[j] for j in range(nx)] for i in range(ny)]
    return T


def pot_sinkhorn(a, b, M, reg, n_iter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": stopThr=0 runs all iterations
        return ot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), reg, method="sinkhorn",
                           numItermax=n_iter, stopThr=0)


# --------------------------------------------------------------------------- IPOT


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iterations,region_atol", [(50, 5e-3), (500, 1e-4)])
def test_ipot_marginals_and_pads(seed, iterations, region_atol):
    """The last update of each IPOT step is the text side, so per-word mass is 1/n_x to
    rounding after any number of steps; per-region mass 1/n_y only converges: after UNITER's
    50 steps it is off by up to ~2e-3 on costs uniform in [0, 2], within 1e-4 after 500."""
    C, txt_pad, img_pad = ragged_cost(seed, dtype=torch.float32)
    T = ipot_plan(C, txt_pad, img_pad, beta=0.5, iterations=iterations, k=1)  # [B, Ni, Nt]
    assert T.shape == (4, NI, NT) and T.dtype == torch.float32 and not T.requires_grad
    for e, (nx, ny) in enumerate(zip(TXT_LEN, IMG_LEN)):
        valid = T[e, :ny, :nx].double()
        per_word, per_region = valid.sum(0), valid.sum(1)
        torch.testing.assert_close(per_word, torch.full_like(per_word, 1 / nx), atol=1e-6, rtol=0)
        torch.testing.assert_close(per_region, torch.full_like(per_region, 1 / ny),
                                   atol=region_atol, rtol=0)
        assert torch.isfinite(valid).all() and (valid >= 0).all()  # tiny entries underflow to 0
        assert (T[e, ny:, :] == 0).all() and (T[e, :, nx:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipot_marginals_within_1e4_after_50_iterations_on_wra_problems(seed):
    """Random problems shaped like WRA's: cosine costs between random 768-d word and
    region states, 12-60 words and 10-100 regions per example, ragged, fp32. After
    UNITER's 50 iterations every word carries 1/n_x and every region 1/n_y to 1e-4."""
    g = torch.Generator().manual_seed(seed)
    b, nt, ni, h = 8, 60, 100, 768
    txt_len = torch.randint(12, nt + 1, (b,), generator=g)  # [B]
    img_len = torch.randint(10, ni + 1, (b,), generator=g)  # [B]
    txt_pad = torch.arange(nt)[None] >= txt_len[:, None]  # [B, Nt]
    img_pad = torch.arange(ni)[None] >= img_len[:, None]  # [B, Ni]
    C = cosine_cost(torch.randn(b, nt, h, generator=g), torch.randn(b, ni, h, generator=g))  # [B, Nt, Ni]
    T = ipot_plan(C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0), txt_pad, img_pad,
                  beta=0.5, iterations=50, k=1)  # [B, Ni, Nt]
    for e in range(b):
        nx, ny = int(txt_len[e]), int(img_len[e])
        valid = T[e, :ny, :nx].double()
        torch.testing.assert_close(valid.sum(0), torch.full((nx,), 1 / nx, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(valid.sum(1), torch.full((ny,), 1 / ny, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed,beta,iterations",
                         [(10, 0.05, 1500), (11, 0.05, 1500), (12, 0.05, 1000), (13, 0.1, 1000)])
def test_ipot_small_beta_reaches_exact_emd(seed, beta, iterations):
    """Proximal-point IPOT converges to exact OT. Not much below beta = 0.05 on costs in
    [0, 2]: exp(-C / beta) * T then underflows even in fp64 and the plan stalls."""
    C, txt_pad, img_pad = ragged_cost(seed, dtype=torch.float64)
    T = ipot_plan(C, txt_pad, img_pad, beta=beta, iterations=iterations)
    C = C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
    d = (C * T.transpose(1, 2)).sum((1, 2))
    for e, (nx, ny) in enumerate(zip(TXT_LEN, IMG_LEN)):
        M = C[e, :nx, :ny].numpy()
        exact = ot.emd2(np.full(nx, 1 / nx), np.full(ny, 1 / ny), M)
        assert abs(d[e].item() - exact) <= 0.01 * exact, (e, d[e].item(), exact)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta,iterations,k", [(0.5, 50, 1), (0.3, 20, 2)])
def test_ipot_matches_scalar_uniter(dtype, beta, iterations, k):
    C, txt_pad, img_pad = ragged_cost(3, dtype=torch.float64, high=1.5)
    T = ipot_plan(C.to(dtype), txt_pad, img_pad, beta=beta, iterations=iterations, k=k)
    assert T.dtype == dtype
    for e, (nx, ny) in enumerate(zip(TXT_LEN, IMG_LEN)):
        ref = torch.zeros(NI, NT, dtype=torch.float64)
        scalar = uniter_ipot_scalar(C[e, :nx, :ny].tolist(), beta, iterations, k)
        ref[:ny, :nx] = torch.tensor(scalar, dtype=torch.float64)
        torch.testing.assert_close(T[e].double(), ref, atol=1e-6, rtol=0)


def test_ipot_ignores_cost_values_at_pads():
    C, txt_pad, img_pad = ragged_cost(4)
    joint = txt_pad[:, :, None] | img_pad[:, None, :]
    T1 = ipot_plan(C, txt_pad, img_pad)
    T2 = ipot_plan(C.masked_fill(joint, -3.0), txt_pad, img_pad)
    torch.testing.assert_close(T1, T2, atol=0, rtol=0)


# --------------------------------------------------------------------------- distance / loss


def test_cosine_cost_values_and_dtype():
    g = torch.Generator().manual_seed(5)
    txt = torch.randn(2, 3, 8, generator=g)
    img = torch.randn(2, 4, 8, generator=g)
    C = cosine_cost(txt.bfloat16(), img.bfloat16())
    assert C.shape == (2, 3, 4) and C.dtype == torch.float32
    ref = 1 - torch.nn.functional.cosine_similarity(txt[:, :, None], img[:, None], dim=-1)
    torch.testing.assert_close(cosine_cost(txt, img), ref, atol=1e-5, rtol=0)
    zero = cosine_cost(torch.zeros(1, 1, 8), img[:1])  # eps guards a zero vector: cos = 0
    torch.testing.assert_close(zero, torch.ones(1, 1, 4))


def test_ot_distance_gradient_is_through_cost_only():
    g = torch.Generator().manual_seed(6)
    B, H = len(TXT_LEN), 16
    txt_pad, img_pad = pads(TXT_LEN, NT), pads(IMG_LEN, NI)
    txt = torch.randn(B, NT, H, generator=g, dtype=torch.float64, requires_grad=True)
    img = torch.randn(B, NI, H, generator=g, dtype=torch.float64, requires_grad=True)
    d = ot_distance(txt, img, txt_pad, img_pad)
    assert d.shape == (B,) and d.dtype == torch.float64
    d.sum().backward()

    # manual version: cosine cost by hand, plan held constant
    t2, i2 = txt.detach().clone().requires_grad_(), img.detach().clone().requires_grad_()
    xn = t2 / t2.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    yn = i2 / i2.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    C = (1 - xn @ yn.transpose(1, 2)).masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
    T_fixed = ipot_plan(C.detach(), txt_pad, img_pad)
    d_ref = torch.diagonal(C @ T_fixed, dim1=1, dim2=2).sum(-1)  # UNITER's trace(C @ T)
    d_ref.sum().backward()

    torch.testing.assert_close(d, d_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(txt.grad, t2.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(img.grad, i2.grad, atol=1e-12, rtol=1e-10)
    for e, (nx, ny) in enumerate(zip(TXT_LEN, IMG_LEN)):
        assert txt.grad[e, :nx].abs().sum() > 0 and img.grad[e, :ny].abs().sum() > 0
        assert (txt.grad[e, nx:] == 0).all() and (img.grad[e, ny:] == 0).all()


def test_ot_distance_fp32_from_half_inputs():
    g = torch.Generator().manual_seed(7)
    txt = torch.randn(4, NT, 8, generator=g).half()
    img = torch.randn(4, NI, 8, generator=g).half()
    d = ot_distance(txt, img, pads(TXT_LEN, NT), pads(IMG_LEN, NI))
    assert d.dtype == torch.float32 and torch.isfinite(d).all() and (d > 0).all()


def test_wra_loss_by_hand():
    d = torch.tensor([0.3, 0.5, 0.2, 0.9, 0.4], requires_grad=True)
    targets = torch.tensor([1, 0, 1, 0, 0])
    loss, pos_sum, neg_sum, n_pos, n_neg = wra_loss(d, targets)
    torch.testing.assert_close(loss, torch.tensor((0.3 + 0.2 - 0.5 - 0.9 - 0.4) / 5))
    torch.testing.assert_close(pos_sum, torch.tensor(0.5))
    torch.testing.assert_close(neg_sum, torch.tensor(1.8))
    assert n_pos.item() == 2 and n_neg.item() == 3
    loss.backward()
    torch.testing.assert_close(d.grad, torch.tensor([1, -1, 1, -1, -1]) / 5.0)


def test_wra_loss_all_positive():
    loss, pos_sum, neg_sum, n_pos, n_neg = wra_loss(torch.tensor([1.0, 3.0]), torch.tensor([1, 1]))
    torch.testing.assert_close(loss, torch.tensor(2.0))
    assert neg_sum.item() == 0 and n_neg.item() == 0 and n_pos.item() == 2


# --------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("n,m,reg,n_iter", [(5, 7, 0.1, 100), (8, 3, 0.05, 20), (6, 6, 1.0, 1),
                                            (4, 9, 0.02, 300)])
def test_sinkhorn_matches_pot(n, m, reg, n_iter):
    g = torch.Generator().manual_seed(n * 100 + m)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    M = torch.rand(n, m, generator=g, dtype=torch.float64)
    P = sinkhorn_plan(a[None], b[None], M[None], reg, n_iter)[0]
    assert P.dtype == torch.float64
    torch.testing.assert_close(P, torch.from_numpy(pot_sinkhorn(a, b, M, reg, n_iter)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P, torch.from_numpy(pot_sinkhorn(a, b, M, reg, n_iter)),
                               atol=1e-12, rtol=1e-8)  # in fact equal to rounding


def test_sinkhorn_batched_ragged_matches_pot():
    g = torch.Generator().manual_seed(8)
    n_len, m_len, N, Mx, reg, n_iter = [6, 3, 6, 2], [5, 5, 2, 4], 6, 5, 0.1, 50
    a = (torch.rand(4, N, generator=g, dtype=torch.float64) + 0.1) * ~pads(n_len, N)
    b = (torch.rand(4, Mx, generator=g, dtype=torch.float64) + 0.1) * ~pads(m_len, Mx)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    M = torch.rand(4, N, Mx, generator=g, dtype=torch.float64)
    M = M.masked_fill((a == 0)[:, :, None] | (b == 0)[:, None, :], float("nan"))  # must not leak
    P = sinkhorn_plan(a, b, M, reg, n_iter)
    for e, (n, m) in enumerate(zip(n_len, m_len)):
        ref = pot_sinkhorn(a[e, :n], b[e, :m], M[e, :n, :m], reg, n_iter)
        torch.testing.assert_close(P[e, :n, :m], torch.from_numpy(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(P[e, :n, :m], torch.from_numpy(ref), atol=1e-12, rtol=1e-8)
        assert (P[e, n:] == 0).all() and (P[e, :, m:] == 0).all()
    P32 = sinkhorn_plan(a.float(), b.float(), M.float(), reg, n_iter)
    assert P32.dtype == torch.float32
    torch.testing.assert_close(P32.double(), P, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- argument checks


def test_shape_and_dtype_errors():
    C, txt_pad, img_pad = ragged_cost(9)
    with pytest.raises(ValueError, match="txt_pad must be a bool"):
        ipot_plan(C, txt_pad.long(), img_pad)
    with pytest.raises(ValueError, match="img_pad must be a bool"):
        ipot_plan(C, txt_pad, img_pad[:, :-1])
    with pytest.raises(ValueError, match="C must be a 3-D floating"):
        ipot_plan(C[0], txt_pad, img_pad)
    with pytest.raises(ValueError, match="beta"):
        ipot_plan(C, txt_pad, img_pad, beta=0.0)
    with pytest.raises(ValueError, match="iterations"):
        ipot_plan(C, txt_pad, img_pad, iterations=0)
    with pytest.raises(ValueError, match="share B and H"):
        cosine_cost(torch.randn(2, 3, 8), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="txt_pad"):
        ot_distance(torch.randn(4, NT, 8), torch.randn(4, NI, 8), txt_pad[:, :-1], img_pad)
    with pytest.raises(ValueError, match="itm_targets"):
        wra_loss(torch.rand(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"M \[B, n, m\]"):
        sinkhorn_plan(torch.rand(2, 3), torch.rand(2, 4), torch.rand(2, 4, 3), 0.1, 10)
