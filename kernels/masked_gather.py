"""Masked gather: hidden states at masked positions for the MLM / MRM heads (DESIGN §7).

Pure-torch reference. The flat indices `b * L + l` are computed on the host in
collate, so the device never runs `nonzero` (which would force a host sync and
give a data-dependent shape). Backward of `index_select` is a scatter-add into
a zero [B * L, H] gradient.
"""
from __future__ import annotations

from torch import Tensor


def masked_gather(hidden: Tensor, index: Tensor) -> Tensor:
    """Gather rows of `hidden` [B, L, H] at flat positions `index` [N] -> [N, H]."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex:
        raise ValueError(
            "index must be a 1-D integer tensor of flat positions b*L+l, "
            f"got {index.dtype} {tuple(index.shape)}"
        )
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # [N, H]
