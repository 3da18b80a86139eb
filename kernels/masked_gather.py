"""Masked gather for the MLM / MRM heads (docs/design.md, "Kernels"): Triton kernels beside the torch
reference.

`out[n] = hidden.view(B * L, H)[index[n]]`. The flat positions `index = b * L + l`
are computed on the host in collate, so the device never runs `nonzero` (a host
sync and a data-dependent shape, which `hidden[mask]` costs on every call).

Backward is a scatter of the output gradient into a [B * L, H] gradient that is 0
elsewhere. The kernel writes every gradient row exactly once, from an inverse map
`row -> n` (-1 off the mask) built on the device: no separate zero fill, no atomics,
deterministic. That needs distinct positions, which collate's positions of a
mask are; the reference (`index_select`, whose backward is `index_add`) also sums
repeated positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import use_kernel
from kernels.triton_jit import jit, tl, triton

__all__ = ["masked_gather", "masked_gather_reference", "MaskedGather"]


def _check_args(hidden: Tensor, index: Tensor) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, H], got shape {tuple(getattr(hidden, 'shape', ()))}")
    if (not isinstance(index, Tensor) or index.dim() != 1 or index.dtype.is_floating_point
            or index.dtype.is_complex or index.dtype == torch.bool):
        raise ValueError(
            "index must be a 1-D integer tensor of flat positions b*L+l (collate's mlm_index / "
            f"mrm_index), got {getattr(index, 'dtype', type(index).__name__)} "
            f"{tuple(getattr(index, 'shape', ()))}"
        )


def masked_gather_reference(hidden: Tensor, index: Tensor) -> Tensor:
    """Rows of `hidden` [B, L, H] at flat positions `index` [N] -> [N, H]."""
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # [N, H]


# --------------------------------------------------------------------------- Triton


@jit
def _gather_rows_kernel(src_ptr, index_ptr, out_ptr, n_rows, width,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[n, :] = src[index[n], :] for a [BLOCK_N, BLOCK_H] tile."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = tl.load(index_ptr + n, mask=n < n_rows, other=0).to(tl.int64)  # [BN]
    in_bounds = (n < n_rows)[:, None] & (h < width)[None, :]
    x = tl.load(src_ptr + rows[:, None] * width + h[None, :], mask=in_bounds)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * width + h[None, :], x, mask=in_bounds)


@jit
def _scatter_rows_kernel(grad_out_ptr, inverse_ptr, grad_in_ptr, n_rows, width,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_in[r, :] = grad_out[inverse[r], :] where inverse[r] >= 0, else 0."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(inverse_ptr + r, mask=r < n_rows, other=-1).to(tl.int64)  # [BR]
    in_bounds = (r < n_rows)[:, None] & (h < width)[None, :]
    g = tl.load(grad_out_ptr + src[:, None] * width + h[None, :],
                mask=in_bounds & (src >= 0)[:, None], other=0.0)
    tl.store(grad_in_ptr + r.to(tl.int64)[:, None] * width + h[None, :], g, mask=in_bounds)


def _blocks(width: int) -> tuple[int, int]:
    """(rows, columns) per program: up to 256 columns, about 2048 elements (bf16 spills at 4096)."""
    block_h = min(triton.next_power_of_2(width), 256)
    return max(1, 2048 // block_h), block_h


def gather_rows_triton(src: Tensor, index: Tensor) -> Tensor:
    """src [R, H] contiguous, index [N] -> src[index] [N, H]."""
    n, width = index.numel(), src.size(1)
    out = torch.empty(n, width, dtype=src.dtype, device=src.device)
    if n and width:
        block_n, block_h = _blocks(width)
        grid = (triton.cdiv(n, block_n), triton.cdiv(width, block_h))
        _gather_rows_kernel[grid](src, index, out, n, width, BLOCK_N=block_n, BLOCK_H=block_h)
    return out


def scatter_rows_triton(grad_out: Tensor, index: Tensor, n_rows: int) -> Tensor:
    """grad_out [N, H], distinct index [N] -> [n_rows, H], grad_out rows at index, 0 elsewhere."""
    n, width = grad_out.shape
    inverse = torch.full((n_rows,), -1, dtype=torch.int32, device=grad_out.device)  # [R]
    inverse.scatter_(0, index.long(), torch.arange(n, dtype=torch.int32, device=grad_out.device))
    grad_in = torch.empty(n_rows, width, dtype=grad_out.dtype, device=grad_out.device)
    if n_rows and width:
        block_r, block_h = _blocks(width)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(width, block_h))
        _scatter_rows_kernel[grid](grad_out.contiguous(), inverse, grad_in, n_rows, width,
                                   BLOCK_R=block_r, BLOCK_H=block_h)
    return grad_in


class MaskedGather(torch.autograd.Function):
    """hidden [B, L, H], index [N] -> [N, H]; backward scatters into [B, L, H]."""

    @staticmethod
    def forward(ctx, hidden: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.hidden_shape = hidden.shape
        return gather_rows_triton(hidden.reshape(-1, hidden.size(-1)).contiguous(), index)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (index,) = ctx.saved_tensors
        b, length, h = ctx.hidden_shape
        return scatter_rows_triton(grad_out, index, b * length).view(b, length, h), None


# --------------------------------------------------------------------------- dispatch


def masked_gather(hidden: Tensor, index: Tensor) -> Tensor:
    """Gather rows of `hidden` [B, L, H] at distinct flat positions `index` [N] -> [N, H]."""
    _check_args(hidden, index)
    if use_kernel("masked_gather", (hidden, index)):
        return MaskedGather.apply(hidden, index)
    return masked_gather_reference(hidden, index)
