"""Optimal transport for WRA (word-region alignment) and plain entropic Sinkhorn (DESIGN §3, §7).

Pure-torch batched references. A fused Triton kernel (one program per problem,
cost tile kept on chip for all iterations) will plug in behind these same
functions, so callers never change.

Conventions: text is the "x" side (Nt word pieces incl. [CLS]/[SEP]), regions the
"y" side (Ni boxes). Pad masks are bool, True at padding. The cost is
`C [B, Nt, Ni]`; the IPOT plan is `T [B, Ni, Nt]` (UNITER's layout), so the
distance is `trace(C @ T)`.

Everything is computed in at least fp32: half inputs are cast up, fp64 inputs
stay fp64 (useful for tests; the fused kernel will be fp32). Nothing here syncs
with the host: no `.item()`, no `nonzero`, no data-dependent shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_cost", "ipot_plan", "ot_distance", "wra_loss", "sinkhorn"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (half / bf16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name: str, t: Tensor, dim: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != dim or not t.dtype.is_floating_point:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, Tensor) else ""
        raise ValueError(f"{name} must be a {dim}-D floating tensor, got {dtype} {shape}")


def _check_pad(name: str, pad: Tensor, shape: tuple[int, int]) -> None:
    if not isinstance(pad, Tensor) or pad.dtype != torch.bool or tuple(pad.shape) != shape:
        got = f"{pad.dtype} {tuple(pad.shape)}" if isinstance(pad, Tensor) else type(pad).__name__
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape} (True at padding), got {got}; "
            "convert an attention mask with `pad = ~mask.bool()`"
        )


def _check_ipot_args(beta: float, iterations: int, k: int) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if int(iterations) < 1 or int(k) < 1:
        raise ValueError(f"iterations and k must be >= 1, got iterations={iterations}, k={k}")


def cosine_cost(txt: Tensor, img: Tensor, eps: float = 1e-5) -> Tensor:
    """Cosine distance `1 - cos(txt_i, img_j)`: [B, Nt, H], [B, Ni, H] -> C [B, Nt, Ni].

    Rows are L2-normalised with `F.normalize(eps=eps)`; computed in (at least) fp32.
    Differentiable w.r.t. both inputs. Padding is not masked here (see `ot_distance`).
    """
    _check_float("txt", txt, 3)
    _check_float("img", img, 3)
    if txt.size(0) != img.size(0) or txt.size(2) != img.size(2):
        raise ValueError(
            f"txt [B, Nt, H] and img [B, Ni, H] must share B and H, "
            f"got {tuple(txt.shape)} and {tuple(img.shape)}"
        )
    dtype = _compute_dtype(txt, img)
    x = F.normalize(txt.to(dtype), p=2, dim=-1, eps=eps)  # [B, Nt, H]
    y = F.normalize(img.to(dtype), p=2, dim=-1, eps=eps)  # [B, Ni, H]
    return 1 - x.matmul(y.transpose(1, 2))  # [B, Nt, Ni]


@torch.no_grad()
def ipot_plan(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
              iterations: int = 50, k: int = 1) -> Tensor:
    """IPOT transport plan (UNITER's `ipot`), uniform marginals: C [B, Nt, Ni] -> T [B, Ni, Nt].

    `txt_pad` [B, Nt] / `img_pad` [B, Ni] are True at padding. Each valid word gets
    mass 1/n_x (exact after every step: the text side is updated last); each valid
    region tends to 1/n_y as the iterations converge. T is exactly 0 at any pair
    involving a pad. No gradient (proximal point plan). Same arithmetic order as
    UNITER (bitwise equal for k=1; UNITER's own code fails on shapes for k > 1).
    """
    _check_float("C", C, 3)
    b, nt, ni = C.shape
    _check_pad("txt_pad", txt_pad, (b, nt))
    _check_pad("img_pad", img_pad, (b, ni))
    _check_ipot_args(beta, iterations, k)
    C = C.to(_compute_dtype(C))

    joint_pad = img_pad[:, :, None] | txt_pad[:, None, :]  # [B, Ni, Nt]
    n_x = (nt - txt_pad.sum(1)).to(C.dtype)[:, None, None]  # [B, 1, 1] valid words
    n_y = (ni - img_pad.sum(1)).to(C.dtype)[:, None, None]  # [B, 1, 1] valid regions
    x_mask = (txt_pad.to(C.dtype) * 1e4)[:, None, :]  # [B, 1, Nt]
    y_mask = (img_pad.to(C.dtype) * 1e4)[:, :, None]  # [B, Ni, 1]

    sigma = torch.ones(b, nt, 1, dtype=C.dtype, device=C.device) / n_x  # [B, Nt, 1]
    sigma = sigma.masked_fill(txt_pad[:, :, None], 0)
    T = torch.ones(b, ni, nt, dtype=C.dtype, device=C.device)  # [B, Ni, Nt]
    T = T.masked_fill(joint_pad, 0)
    A = torch.exp(-C.transpose(1, 2) / beta).masked_fill(joint_pad, 0)  # [B, Ni, Nt]

    for _ in range(int(iterations)):
        Q = A * T  # [B, Ni, Nt]
        for _ in range(int(k)):
            delta = 1 / (n_y * Q.matmul(sigma) + y_mask)  # [B, Ni, 1]
            sigma_row = 1 / (n_x * delta.transpose(1, 2).matmul(Q) + x_mask)  # [B, 1, Nt]
            sigma = sigma_row.transpose(1, 2)  # [B, Nt, 1]
        T = delta * Q * sigma_row  # [B, Ni, Nt]
    return T.masked_fill(joint_pad, 0)


def ot_distance(txt: Tensor, img: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
                iterations: int = 50, k: int = 1) -> Tensor:
    """WRA optimal-transport distance (UNITER's `optimal_transport_dist`) -> d [B].

    txt [B, Nt, H], img [B, Ni, H], pads [B, Nt] / [B, Ni] bool (True = pad).
    `d = trace(C @ T)` with C the cosine cost (0 on pad pairs) and T the IPOT plan
    of the detached cost: the gradient flows through C only, to both inputs.
    """
    C = cosine_cost(txt, img)  # [B, Nt, Ni]
    b, nt, ni = C.shape
    _check_pad("txt_pad", txt_pad, (b, nt))
    _check_pad("img_pad", img_pad, (b, ni))
    C = C.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)  # [B, Nt, Ni]
    T = ipot_plan(C.detach(), txt_pad, img_pad, beta, iterations, k)  # [B, Ni, Nt]
    return (C * T.transpose(1, 2)).sum((1, 2))  # [B]


def wra_loss(distance: Tensor, itm_targets: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """WRA loss from OT distances d [B] and ITM targets [B] (1 = matched pair, 0 = negative).

    Returns `(ot_loss, ot_pos_sum, ot_neg_sum, n_pos, n_neg)` with
    `ot_loss = (sum d[pos] - sum d[neg]) / (n_pos + n_neg)` as UNITER (= / B for
    0/1 targets). Sums and counts are tensors, so validation can accumulate mean
    ot_pos / ot_neg without a host sync.
    """
    _check_float("distance", distance, 1)
    if (itm_targets.shape != distance.shape or itm_targets.dtype.is_floating_point
            or itm_targets.dtype == torch.bool):
        raise ValueError(
            f"itm_targets must be an integer tensor shaped like distance {tuple(distance.shape)}, "
            f"got {itm_targets.dtype} {tuple(itm_targets.shape)}"
        )
    pos = itm_targets == 1  # [B]
    neg = itm_targets == 0  # [B]
    zero = distance.new_zeros(())
    ot_pos_sum = torch.where(pos, distance, zero).sum()
    ot_neg_sum = torch.where(neg, distance, zero).sum()
    n_pos, n_neg = pos.sum(), neg.sum()
    ot_loss = (ot_pos_sum - ot_neg_sum) / (n_pos + n_neg).clamp_min(1)
    return ot_loss, ot_pos_sum, ot_neg_sum, n_pos, n_neg


def sinkhorn(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int) -> Tensor:
    """Entropic OT plan by Sinkhorn-Knopp, batched: a [B, n], b [B, m], M [B, n, m] -> [B, n, m].

    Same iteration as POT's `ot.sinkhorn(a, b, M, reg, numItermax=iterations,
    stopThr=0)`: u = v = uniform, K = exp(-M / reg), then per iteration
    `v = b / (K^T u)`, `u = a / (K v)`; plan = u K v. Ragged batches: zeros in a / b
    mark pads; those rows / columns of K are zeroed and of the plan stay exactly 0
    (no division by zero). Unlike POT there is no early stop and no roll-back
    on numerical underflow (that would need host syncs): pick `reg` accordingly.
    """
    _check_float("a", a, 2)
    _check_float("b", b, 2)
    _check_float("M", M, 3)
    if M.shape != (a.size(0), a.size(1), b.size(1)) or b.size(0) != a.size(0):
        raise ValueError(
            f"expected a [B, n], b [B, m], M [B, n, m], got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(M.shape)}"
        )
    if not reg > 0 or int(iterations) < 0:
        raise ValueError(f"reg must be > 0 and iterations >= 0, got reg={reg}, "
                         f"iterations={iterations}")
    dtype = _compute_dtype(a, b, M)
    a, b, M = a.to(dtype), b.to(dtype), M.to(dtype)
    a_pad, b_pad = a <= 0, b <= 0  # [B, n], [B, m]
    K = torch.exp(M / (-reg)).masked_fill(a_pad[:, :, None] | b_pad[:, None, :], 0)  # [B, n, m]
    u = (~a_pad).to(dtype) / (~a_pad).sum(1, keepdim=True).clamp_min(1).to(dtype)  # [B, n]
    v = (~b_pad).to(dtype) / (~b_pad).sum(1, keepdim=True).clamp_min(1).to(dtype)  # [B, m]
    one = torch.ones((), dtype=dtype, device=M.device)
    for _ in range(int(iterations)):
        Ktu = K.transpose(1, 2).matmul(u[:, :, None])[:, :, 0]  # [B, m]
        v = b / torch.where(b_pad, one, Ktu)
        Kv = K.matmul(v[:, :, None])[:, :, 0]  # [B, n]
        u = a / torch.where(a_pad, one, Kv)
    return u[:, :, None] * K * v[:, None, :]  # [B, n, m]
