"""Word-region alignment (WRA) by optimal transport (UNITER; docs/models.md, "ITM and WRA").

`ot_distance` = cosine cost between the last-layer text and region states (torch,
differentiable) -> IPOT plan and distance through `kernels.ipot.ipot` (the fused
kernel where it can run, else the torch reference) -> `wra_loss`.
Nothing here syncs with the host: no `.item()`, no `nonzero`, no data-dependent shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.checks import check_float, check_pad, compute_dtype
from kernels.ipot import ipot

__all__ = ["cosine_cost", "ot_distance", "wra_loss"]


def cosine_cost(txt: Tensor, img: Tensor, eps: float = 1e-5) -> Tensor:
    """Cosine distance `1 - cos(txt_i, img_j)`: [B, Nt, H], [B, Ni, H] -> C [B, Nt, Ni].

    Rows are L2-normalised with `F.normalize(eps=eps)`; computed in (at least) fp32.
    Differentiable w.r.t. both inputs. Padding is not masked here (see `ot_distance`).
    """
    check_float("txt", txt, 3)
    check_float("img", img, 3)
    if txt.size(0) != img.size(0) or txt.size(2) != img.size(2):
        raise ValueError(
            f"txt [B, Nt, H] and img [B, Ni, H] must share B and H, "
            f"got {tuple(txt.shape)} and {tuple(img.shape)}"
        )
    dtype = compute_dtype(txt, img)
    x = F.normalize(txt.to(dtype), p=2, dim=-1, eps=eps)  # [B, Nt, H]
    y = F.normalize(img.to(dtype), p=2, dim=-1, eps=eps)  # [B, Ni, H]
    return 1 - x.matmul(y.transpose(1, 2))  # [B, Nt, Ni]


def ot_distance(txt: Tensor, img: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
                iterations: int = 50, k: int = 1) -> Tensor:
    """WRA optimal-transport distance (UNITER's `optimal_transport_dist`) -> d [B].

    txt [B, Nt, H], img [B, Ni, H], pads [B, Nt] / [B, Ni] bool (True = pad).
    `d = trace(C @ T)` with C the cosine cost (0 on pad pairs) and T the IPOT plan
    of the detached cost: the gradient flows through C only, to both inputs.
    """
    C = cosine_cost(txt, img)  # [B, Nt, Ni]
    b, nt, ni = C.shape
    check_pad("txt_pad", txt_pad, (b, nt))
    check_pad("img_pad", img_pad, (b, ni))
    _, d = ipot(C, txt_pad, img_pad, beta, iterations, k)  # plan [B, Ni, Nt], d [B]
    return d


def wra_loss(distance: Tensor, itm_targets: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """WRA loss from OT distances d [B] and ITM targets [B] (1 = matched pair, 0 = negative).

    Returns `(ot_loss, ot_pos_sum, ot_neg_sum, n_pos, n_neg)` with
    `ot_loss = (sum d[pos] - sum d[neg]) / (n_pos + n_neg)` as UNITER (= / B for
    0/1 targets). Sums and counts are tensors, so validation can accumulate mean
    ot_pos / ot_neg without a host sync.
    """
    check_float("distance", distance, 1)
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
