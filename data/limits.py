"""What one shard sample may cost and hold (DecodeLimits), with the defaults behind it.

A module of its own, below both readers: data/shards.py and
data/pixels.py import it, so the picture decoder needs nothing from the shard reader.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_MEMBER_BYTES = 256 << 20
"""Default of `data.max_member_bytes`: the largest tar member read into memory."""
DEFAULT_MAX_CAPTIONS = 256
"""Default of `DecodeLimits.max_captions`; the picture builders split an image with more captions
into several samples of at most this many (COCO has 5-7 per image)."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
DTYPE_MAX = {"fp32": FLOAT32_MAX, "bf16": 3.3895313892515355e38, "fp16": 65504.0}
"""Largest finite value of each training precision (precision.dtype)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one sample may cost and hold; beyond it the sample is skipped, before it is decoded."""

    max_image_pixels: int = 50_000_000
    """Width x height from a picture's header (about 150 MB decoded to RGB)."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Bytes of a tar member (iter_shard), and of an npz's arrays together once inflated, known
    from its zip directory and .npy headers."""
    max_abs_value: float = FLOAT32_MAX
    """Largest |value| of features, boxes and soft labels once decoded: float32's range, or the
    training precision's (DTYPE_MAX) where that is narrower."""
    max_captions: int = DEFAULT_MAX_CAPTIONS
    """Captions of one picture in a vlpt-pixels-v2 sample; a sample listing more is one bad input
    ("too_many_captions"), so a hostile list cannot turn one sample into millions of pairs."""
