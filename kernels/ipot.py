"""IPOT optimal transport for WRA (UNITER; docs/models.md, "ITM and WRA"): Triton kernel beside its torch
reference.

Conventions: text is the "x" side (Nt word pieces incl. [CLS]/[SEP]), regions the
"y" side (Ni boxes); pad masks are bool, True at padding. The cost is
`C [B, Nt, Ni]`; the plan is `T [B, Ni, Nt]` (UNITER's layout), so the distance
is `d = trace(C @ T)`. The plan is a proximal-point solution held constant: `d`
is differentiable in C only, `dd/dC = T^T`.

- `ipot_plan`: the reference plan, UNITER's batched loop of small ops.
- `_ipot_kernel`: one program per problem; the [Nt, Ni] tiles of exp(-C/beta) and
  of the plan stay in registers for all iterations, so a call is one launch.
- `IpotDistance`: autograd Function around the kernel.
- `ipot(C, txt_pad, img_pad, ...) -> (T, d)`: the dispatch the WRA loss calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.checks import check_float, check_pad, compute_dtype, tile_blocks, tile_unsupported
from kernels.dispatch import use_kernel
from kernels.triton_jit import jit, tl

__all__ = ["ipot", "ipot_plan", "ipot_reference", "ipot_triton", "IpotDistance", "MAX_TILE"]

MAX_TILE = 8192
"""Largest padded Nt x Ni tile kept on chip: WRA's 62 word pieces x 100 regions pad to 64 x 128."""


def _check_args(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float, iterations: int,
                k: int) -> None:
    check_float("C", C, 3)
    b, nt, ni = C.shape
    check_pad("txt_pad", txt_pad, (b, nt))
    check_pad("img_pad", img_pad, (b, ni))
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if int(iterations) < 1 or int(k) < 1:
        raise ValueError(f"iterations and k must be >= 1, got iterations={iterations}, k={k}")


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def ipot_plan(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
              iterations: int = 50, k: int = 1) -> Tensor:
    """IPOT transport plan (UNITER's `ipot`), uniform marginals: C [B, Nt, Ni] -> T [B, Ni, Nt].

    Each valid word gets mass 1/n_x (exact after every step: the text side is
    updated last); each valid region tends to 1/n_y as the iterations converge.
    T is exactly 0 at any pair involving a pad. Same arithmetic order as UNITER
    (bitwise equal for k=1; UNITER's own code fails on shapes for k > 1).
    Computed in at least fp32 (fp64 stays fp64). No host sync.
    """
    _check_args(C, txt_pad, img_pad, beta, iterations, k)
    b, nt, ni = C.shape
    C = C.to(compute_dtype(C))

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


def ipot_reference(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
                   iterations: int = 50, k: int = 1) -> tuple[Tensor, Tensor]:
    """Plan T [B, Ni, Nt] of the detached cost and distance d [B] = trace(C @ T), grad via C."""
    T = ipot_plan(C.detach(), txt_pad, img_pad, beta, iterations, k)  # [B, Ni, Nt]
    joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]  # [B, Nt, Ni]
    C = C.to(T.dtype).masked_fill(joint_pad, 0)  # cost values at pads never matter
    return T, (C * T.transpose(1, 2)).sum((1, 2))


# --------------------------------------------------------------------------- Triton


@jit
def _ipot_kernel(c_ptr, txt_pad_ptr, img_pad_ptr, plan_ptr, dist_ptr, nt, ni,
                 stride_cb, stride_ct, stride_ci, beta, iterations, k_inner,
                 BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)  # text positions
    i = tl.arange(0, BLOCK_I)  # region positions
    t_ok = (tl.load(txt_pad_ptr + b * nt + t, mask=t < nt, other=1) == 0).to(tl.float32)  # [BT]
    i_ok = (tl.load(img_pad_ptr + b * ni + i, mask=i < ni, other=1) == 0).to(tl.float32)  # [BI]
    # A problem with no valid pair has the plan 0 (as the reference's final mask gives);
    # treating both its sides as pads keeps inf / NaN out of its iterations.
    has_pairs = (tl.sum(t_ok, 0) * tl.sum(i_ok, 0) > 0).to(tl.float32)
    t_ok, i_ok = t_ok * has_pairs, i_ok * has_pairs
    t_pad, i_pad = t_ok == 0, i_ok == 0
    n_x = tl.maximum(tl.sum(t_ok, 0), 1.0)  # valid words
    n_y = tl.maximum(tl.sum(i_ok, 0), 1.0)  # valid regions
    valid = (t_pad == 0)[:, None] & (i_pad == 0)[None, :]  # [BT, BI]
    c_ptrs = c_ptr + b * stride_cb + t[:, None] * stride_ct + i[None, :] * stride_ci
    c = tl.load(c_ptrs, mask=valid, other=0.0).to(tl.float32)  # [BT, BI], 0 off the valid pairs
    x_big = tl.where(t_pad, 1e4, 0.0)  # [BT]
    y_big = tl.where(i_pad, 1e4, 0.0)  # [BI]

    A = tl.where(valid, tl.exp(-c / beta), 0.0)  # [BT, BI]
    T = tl.where(valid, 1.0, 0.0)  # [BT, BI]
    sigma = tl.where(t_pad, 0.0, 1.0 / n_x)  # [BT]
    delta = tl.zeros([BLOCK_I], dtype=tl.float32)  # [BI]
    for _ in range(iterations):
        Q = A * T
        for _ in range(k_inner):
            delta = 1.0 / (n_y * tl.sum(Q * sigma[:, None], 0) + y_big)  # [BI]
            sigma = 1.0 / (n_x * tl.sum(Q * delta[None, :], 1) + x_big)  # [BT]
        T = delta[None, :] * Q * sigma[:, None]
    T = tl.where(valid, T, 0.0)

    in_bounds = (t < nt)[:, None] & (i < ni)[None, :]
    tl.store(plan_ptr + b * ni * nt + i[None, :] * nt + t[:, None], T, mask=in_bounds)
    # Re-read the cost (from cache) rather than hold a third tile in registers through the loop.
    c = tl.load(c_ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(dist_ptr + b, tl.sum(tl.sum(c * T, 1), 0))


def ipot_triton(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5,
                iterations: int = 50, k: int = 1) -> tuple[Tensor, Tensor]:
    """Launch the kernel: plan T [B, Ni, Nt] fp32 and distance d [B] fp32 (no autograd)."""
    b, nt, ni = C.shape
    plan = torch.empty(b, ni, nt, dtype=torch.float32, device=C.device)
    dist = torch.empty(b, dtype=torch.float32, device=C.device)
    if b == 0:
        return plan, dist
    block_t, block_i, warps = tile_blocks(nt, ni)
    _ipot_kernel[(b,)](
        C, txt_pad.contiguous().view(torch.uint8), img_pad.contiguous().view(torch.uint8),
        plan, dist, nt, ni, C.stride(0), C.stride(1), C.stride(2), float(beta), int(iterations),
        int(k), BLOCK_T=block_t, BLOCK_I=block_i, num_warps=warps)
    return plan, dist


class IpotDistance(torch.autograd.Function):
    """(C, pads) -> (T, d) by the kernel; backward: dC = grad_d * T^T (the plan is constant)."""

    @staticmethod
    def forward(ctx, C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float, iterations: int,
                k: int):
        plan, dist = ipot_triton(C.detach(), txt_pad, img_pad, beta, iterations, k)
        ctx.mark_non_differentiable(plan)
        ctx.save_for_backward(plan)
        ctx.cost_dtype = C.dtype
        return plan, dist

    @staticmethod
    def backward(ctx, grad_plan: Tensor, grad_dist: Tensor):
        (plan,) = ctx.saved_tensors  # [B, Ni, Nt]
        grad_c = grad_dist[:, None, None] * plan.transpose(1, 2)  # [B, Nt, Ni]
        return grad_c.to(ctx.cost_dtype), None, None, None, None, None


# --------------------------------------------------------------------------- dispatch


def ipot(C: Tensor, txt_pad: Tensor, img_pad: Tensor, beta: float = 0.5, iterations: int = 50,
         k: int = 1) -> tuple[Tensor, Tensor]:
    """IPOT plan T [B, Ni, Nt] (no gradient) and distance d [B] = trace(C @ T) (gradient via C).

    C [B, Nt, Ni] fp32/fp16/bf16 goes to the fused kernel (fp32 inside, fp32 out)
    where `kernels.dispatch` allows; fp64 and oversized tiles use the reference.
    """
    _check_args(C, txt_pad, img_pad, beta, iterations, k)
    unsupported = tile_unsupported((C.dtype,), C.size(1), C.size(2), MAX_TILE)
    if use_kernel("ipot", (C, txt_pad, img_pad), unsupported):
        return IpotDistance.apply(C, txt_pad, img_pad, float(beta), int(iterations), int(k))
    return ipot_reference(C, txt_pad, img_pad, beta, iterations, k)
