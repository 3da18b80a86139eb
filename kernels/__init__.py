"""vlpt kernels: hot-spot ops behind stable function names.

Each op exposed here is today its pure-torch reference; the fused Triton kernels
(with their autograd Functions and one dispatch switch, `VLPT_KERNELS=off`)
will plug in behind the same functions, so callers never change.
"""
from kernels.masked_gather import masked_gather

__all__ = ["masked_gather"]
