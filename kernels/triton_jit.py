"""Triton, when installed, and the mode it runs kernels in (compiled on a GPU, or interpreted).

Triton fixes the mode when it is imported: with TRITON_INTERPRET=1 set at that time
its own library functions (`tl.sum`, ...) and our kernels are jitted for the CPU
interpreter, otherwise for the GPU compiler. Setting the variable later changes
nothing, so the mode is read once, here, when the kernels are imported.

Triton has no wheels for some platforms (macOS): there `triton` is None, `jit` leaves
the kernel a plain function that is never launched, and every op runs its torch
reference (see kernels/dispatch.py). The kernels' annotations are strings (PEP 563),
so their modules import either way.
"""
from __future__ import annotations

import os
from typing import Callable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

__all__ = ["triton", "tl", "jit", "INTERPRETED"]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


INTERPRETED = triton is not None and _interpret_requested()
"""True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""


def jit(fn: Callable) -> Callable:
    """`triton.jit` where Triton is installed; else the function as is (dispatch never launches it)."""
    return triton.jit(fn) if triton is not None else fn
