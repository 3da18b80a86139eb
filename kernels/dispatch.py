"""The one switch between each op's Triton kernel and its torch reference.

`VLPT_KERNELS` (environment, read at every call):
  auto (default)  the compiled kernels on CUDA tensors, the reference elsewhere;
  off             always the reference (debugging, bit-for-bit comparisons);
  on              the kernel, or a ValueError naming why it cannot run. This is also the
                  only mode that runs kernels in Triton's CPU interpreter (a process
                  started with TRITON_INTERPRET=1): a correctness tool, far slower than
                  the reference, so `auto` never picks it.

Each op adds its own limits (dtype, tile size) as `unsupported`.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from kernels.triton_jit import INTERPRETED, triton

MODES = ("auto", "on", "off")


def kernel_mode() -> str:
    raw = os.environ.get("VLPT_KERNELS", "auto")
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"VLPT_KERNELS={raw!r} is not one of {', '.join(MODES)}; "
                         "unset it to use the fused kernels wherever they can run")
    return mode


def device_unsupported(tensors: tuple[Tensor, ...], mode: str) -> Optional[str]:
    """Why these tensors cannot go to a Triton kernel in this process, or None if they can."""
    if triton is None:
        return "Triton is not installed on this platform"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"the inputs are on several devices ({', '.join(sorted(map(str, devices)))})"
    device = devices.pop()
    if INTERPRETED:
        return None if mode == "on" else "Triton's interpreter runs kernels only with VLPT_KERNELS=on"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return ("CPU tensors need Triton's interpreter: start the process with TRITON_INTERPRET=1 "
                "(setting it after Triton is imported has no effect)")
    return f"Triton has no backend for {device.type} tensors here"


def use_kernel(op: str, tensors: tuple[Tensor, ...], unsupported: Optional[str] = None) -> bool:
    """Whether `op` runs its kernel on `tensors`; `unsupported` is the op's own reason not to."""
    mode = kernel_mode()
    if mode == "off":
        return False
    reason = unsupported or device_unsupported(tensors, mode)
    if reason is None:
        return True
    if mode == "on":
        raise ValueError(f"VLPT_KERNELS=on, but the {op} kernel cannot run: {reason}. "
                         "Unset VLPT_KERNELS to fall back to the torch reference.")
    return False
