"""Entropic OT by Sinkhorn-Knopp, batched and ragged: Triton kernel beside its torch reference.

`a [B, n]`, `b [B, m]` marginals (zeros mark pads), `M [B, n, m]` costs, `reg` the
entropic weight. Same iteration as POT's `ot.sinkhorn(a, b, M, reg,
numItermax=iterations, stopThr=0)`: u = v = uniform, K = exp(-M / reg), then per
iteration `v = b / (K^T u)`, `u = a / (K v)`; plan P = u K v. Pad rows / columns
of K are zeroed and of P stay exactly 0 (no division by zero). Unlike POT there
is no early stop and no roll-back on underflow (both would need host syncs):
pick `reg` for the iteration count.

The distance `d = <M, P>` is differentiable in M with P held constant (POT's
"envelope" gradient): `dd/dM = P`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.checks import check_float, compute_dtype, tile_blocks, tile_unsupported
from kernels.dispatch import use_kernel
from kernels.triton_jit import jit, tl

__all__ = ["sinkhorn", "sinkhorn_plan", "sinkhorn_reference", "sinkhorn_triton", "SinkhornDistance",
           "MAX_TILE"]

MAX_TILE = 8192
"""Largest padded n x m tile kept on chip (without register spills on sm_90)."""


def _check_args(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int) -> None:
    check_float("a", a, 2)
    check_float("b", b, 2)
    check_float("M", M, 3)
    if M.shape != (a.size(0), a.size(1), b.size(1)) or b.size(0) != a.size(0):
        raise ValueError(
            f"expected a [B, n], b [B, m], M [B, n, m], got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(M.shape)}"
        )
    if not reg > 0 or int(iterations) < 0:
        raise ValueError(f"reg must be > 0 and iterations >= 0, got reg={reg}, "
                         f"iterations={iterations}")


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def sinkhorn_plan(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int) -> Tensor:
    """Reference plan P [B, n, m], computed in at least fp32 (fp64 stays fp64)."""
    _check_args(a, b, M, reg, iterations)
    dtype = compute_dtype(a, b, M)
    a, b, M = a.to(dtype), b.to(dtype), M.to(dtype)
    a_pad, b_pad = a <= 0, b <= 0  # [B, n], [B, m]
    empty = a_pad.all(1, keepdim=True) | b_pad.all(1, keepdim=True)  # [B, 1] no valid pair
    a_pad, b_pad = a_pad | empty, b_pad | empty  # its plan is 0, not NaN
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


def sinkhorn_reference(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int
                       ) -> tuple[Tensor, Tensor]:
    """Plan P [B, n, m] (no gradient) and distance d [B] = <M, P> (gradient via M)."""
    P = sinkhorn_plan(a.detach(), b.detach(), M.detach(), reg, iterations)
    valid = (a > 0)[:, :, None] & (b > 0)[:, None, :]  # [B, n, m]
    return P, torch.where(valid, M.to(P.dtype) * P, 0).sum((1, 2))  # M at pads never matters


# --------------------------------------------------------------------------- Triton


@jit
def _sinkhorn_kernel(a_ptr, b_ptr, m_ptr, plan_ptr, dist_ptr, n, m, stride_ab, stride_bb,
                     stride_mb, stride_mn, stride_mm, reg, iterations,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_N)  # source positions
    s = tl.arange(0, BLOCK_M)  # target positions
    a = tl.load(a_ptr + p * stride_ab + r, mask=r < n, other=0.0).to(tl.float32)  # [BN]
    b = tl.load(b_ptr + p * stride_bb + s, mask=s < m, other=0.0).to(tl.float32)  # [BM]
    a_ok, b_ok = (a > 0).to(tl.float32), (b > 0).to(tl.float32)  # [BN], [BM]
    has_pairs = (tl.sum(a_ok, 0) * tl.sum(b_ok, 0) > 0).to(tl.float32)  # else plan 0, no inf / NaN
    a_ok, b_ok = a_ok * has_pairs, b_ok * has_pairs
    a_pad, b_pad = a_ok == 0, b_ok == 0
    n_a, n_b = tl.maximum(tl.sum(a_ok, 0), 1.0), tl.maximum(tl.sum(b_ok, 0), 1.0)
    valid = (a_pad == 0)[:, None] & (b_pad == 0)[None, :]  # [BN, BM]
    cost_ptrs = m_ptr + p * stride_mb + r[:, None] * stride_mn + s[None, :] * stride_mm
    cost = tl.load(cost_ptrs, mask=valid, other=0.0).to(tl.float32)  # [BN, BM]
    K = tl.where(valid, tl.exp(cost / (-reg)), 0.0)
    u = tl.where(a_pad, 0.0, 1.0 / n_a)  # [BN]
    v = tl.where(b_pad, 0.0, 1.0 / n_b)  # [BM]
    for _ in range(iterations):
        v = b / tl.where(b_pad, 1.0, tl.sum(K * u[:, None], 0))
        u = a / tl.where(a_pad, 1.0, tl.sum(K * v[None, :], 1))
    P = u[:, None] * K * v[None, :]

    in_bounds = (r < n)[:, None] & (s < m)[None, :]
    tl.store(plan_ptr + p * n * m + r[:, None] * m + s[None, :], P, mask=in_bounds)
    cost = tl.load(cost_ptrs, mask=valid, other=0.0).to(tl.float32)  # re-read: one tile fewer live
    tl.store(dist_ptr + p, tl.sum(tl.sum(cost * P, 1), 0))


def sinkhorn_triton(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int
                    ) -> tuple[Tensor, Tensor]:
    """Launch the kernel: plan P [B, n, m] fp32 and distance d [B] fp32 (no autograd)."""
    bsz, n, m = M.shape
    plan = torch.empty(bsz, n, m, dtype=torch.float32, device=M.device)
    dist = torch.empty(bsz, dtype=torch.float32, device=M.device)
    if bsz == 0:
        return plan, dist
    block_n, block_m, warps = tile_blocks(n, m)
    _sinkhorn_kernel[(bsz,)](
        a, b, M, plan, dist, n, m, a.stride(0), b.stride(0), M.stride(0), M.stride(1), M.stride(2),
        float(reg), int(iterations), BLOCK_N=block_n, BLOCK_M=block_m, num_warps=warps)
    return plan, dist


class SinkhornDistance(torch.autograd.Function):
    """(a, b, M) -> (P, d) by the kernel; backward: dM = grad_d * P (the plan is constant)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int):
        plan, dist = sinkhorn_triton(a.detach(), b.detach(), M.detach(), reg, iterations)
        ctx.mark_non_differentiable(plan)
        ctx.save_for_backward(plan)
        ctx.cost_dtype = M.dtype
        return plan, dist

    @staticmethod
    def backward(ctx, grad_plan: Tensor, grad_dist: Tensor):
        (plan,) = ctx.saved_tensors  # [B, n, m]
        return None, None, (grad_dist[:, None, None] * plan).to(ctx.cost_dtype), None, None


# --------------------------------------------------------------------------- dispatch


def sinkhorn(a: Tensor, b: Tensor, M: Tensor, reg: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Entropic OT plan P [B, n, m] (no gradient) and distance d [B] = <M, P> (gradient via M).

    The fused kernel takes fp32/fp16/bf16 inputs where `kernels.dispatch` allows
    (fp32 inside, fp32 out); fp64 and oversized tiles use the reference.
    """
    _check_args(a, b, M, reg, iterations)
    unsupported = tile_unsupported((a.dtype, b.dtype, M.dtype), M.size(1), M.size(2), MAX_TILE)
    if use_kernel("sinkhorn", (a, b, M), unsupported):
        return SinkhornDistance.apply(a, b, M, float(reg), int(iterations))
    return sinkhorn_reference(a, b, M, reg, iterations)
