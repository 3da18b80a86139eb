"""vlpt kernels: the hot-spot ops, each a fused Triton kernel beside its torch reference.

Callers use the dispatching functions below; `kernels.dispatch` picks the kernel
or the reference per call (device, dtype, tile limits, `VLPT_KERNELS=auto|on|off`).
"""
from kernels.ipot import ipot
from kernels.masked_gather import masked_gather
from kernels.ot import cosine_cost, ot_distance, wra_loss
from kernels.sinkhorn import sinkhorn

__all__ = ["cosine_cost", "ipot", "masked_gather", "ot_distance", "sinkhorn", "wra_loss"]
