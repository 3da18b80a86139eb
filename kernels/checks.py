"""Argument checks and dtype rules shared by the ops' references and dispatchers."""
from __future__ import annotations

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the OT kernels load (they compute in fp32); fp64 stays on the reference."""


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (half / bf16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_float(name: str, t: Tensor, dim: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != dim or not t.dtype.is_floating_point:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, Tensor) else ""
        raise ValueError(f"{name} must be a {dim}-D floating tensor, got {dtype} {shape}")


def check_pad(name: str, pad: Tensor, shape: tuple[int, int]) -> None:
    if not isinstance(pad, Tensor) or pad.dtype != torch.bool or tuple(pad.shape) != shape:
        got = f"{pad.dtype} {tuple(pad.shape)}" if isinstance(pad, Tensor) else type(pad).__name__
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape} (True at padding), got {got}; "
            "convert an attention mask with `pad = ~mask.bool()`"
        )


def tile_unsupported(dtypes: tuple[torch.dtype, ...], rows: int, cols: int, max_tile: int
                     ) -> str | None:
    """Why an on-chip [rows, cols] tile kernel cannot take this problem, or None."""
    for dtype in dtypes:
        if dtype not in KERNEL_DTYPES:
            return f"{dtype} inputs (the kernel loads fp32/fp16/bf16 and computes in fp32)"
    tile = _pow2(rows) * _pow2(cols)
    if tile > max_tile:
        return (f"a {rows}x{cols} problem pads to a {tile}-element tile, over the on-chip "
                f"limit of {max_tile}")
    return None


def tile_warps(tile: int) -> int:
    """Warps for a program holding [tile]-element fp32 tiles across its loop.

    Chosen from ptxas's report for sm_90 (tests/kernels/test_sm90_compile.py): with
    4 warps up to 1,024 elements and 16 above, IPOT and Sinkhorn need at most 128
    registers a thread and spill nothing up to 8,192 elements; 16,384 spills at any count.
    """
    return 4 if tile <= 1024 else 16


def tile_blocks(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK rows, BLOCK cols, num_warps) of the on-chip tile for a rows x cols problem."""
    block_r, block_c = _pow2(rows), _pow2(cols)
    return block_r, block_c, tile_warps(block_r * block_c)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
