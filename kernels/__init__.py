"""vlpt kernels: the hot-spot ops, each a fused Triton kernel beside its torch reference.

One module per op; import the functions from their modules
(`from kernels.masked_gather import masked_gather`, `from kernels.ot import ot_distance, wra_loss`).
`kernels.dispatch` picks the kernel or the reference per call (device, dtype, tile limits,
`VLPT_KERNELS=auto|on|off`). This package exports its submodules only, never a function under
a submodule's name, so `kernels.ipot` is always the module.
"""
from kernels import checks, dispatch, ipot, masked_gather, ot, sinkhorn, triton_jit

__all__ = ["checks", "dispatch", "ipot", "masked_gather", "ot", "sinkhorn", "triton_jit"]
