"""UNITER's MLM text masking and region masking (docs/models.md, "MLM" and "Region masking"),
vectorised but draw-for-draw deterministic.

Random-number order of `mask_tokens`, which defines the result for a given generator state:
  1. `rng.random(T)`: one uniform per word piece, in token order;
  2. `rng.integers(first_random_id, vocab_size, size=K)`: one id per token
     that took the random-replacement branch, in token order (skipped if K=0).
A scalar loop that draws in this order reproduces the output exactly.
"""
from __future__ import annotations

import numpy as np


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    first_random_id: int,
    vocab_size: int,
    prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask word pieces (no [CLS]/[SEP]: collate adds them afterwards).

    Each token is selected with `prob`; a selected token becomes [MASK] (80%),
    a random id in `[first_random_id, vocab_size)` (10%) or stays (10%), and its
    label is the original id. Unselected tokens get label -1. If nothing was
    selected the first token is masked, so every sample has a target.
    Returns (masked_ids [T] int64, labels [T] int64).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"mask_tokens needs a non-empty 1-D id array, got shape {ids.shape}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {prob}")
    if not 0 <= first_random_id < vocab_size:
        raise ValueError(f"random-replacement range [{first_random_id}, {vocab_size}) is empty or negative")
    u = rng.random(ids.size)  # [T]
    selected = u < prob
    masked = ids.copy()
    labels = np.full_like(ids, -1)
    if not selected.any():
        labels[0] = ids[0]
        masked[0] = mask_id
        return masked, labels
    branch = u / prob  # same division as UNITER's `prob /= 0.15`, so thresholds round identically
    to_mask = selected & (branch < 0.8)
    to_random = selected & (branch >= 0.8) & (branch < 0.9)
    masked[to_mask] = mask_id
    n_random = int(to_random.sum())
    if n_random:
        masked[to_random] = rng.integers(first_random_id, vocab_size, size=n_random)
    labels[selected] = ids[selected]
    return masked, labels


def mask_regions(num_bb: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    """UNITER's `_get_img_mask` (docs/models.md, "Region masking"): which of `num_bb` regions to mask,
    [num_bb] bool.

    Random-number order: `rng.random(num_bb)`, one uniform per region (selected
    if < prob); only if none was selected, `rng.integers(num_bb)` picks the one
    region that is masked, so every sample has at least one target.
    """
    num_bb = int(num_bb)
    if num_bb < 1:
        raise ValueError(f"mask_regions needs at least one region, got num_bb={num_bb}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {prob}")
    mask = rng.random(num_bb) < prob  # [num_bb]
    if not mask.any():
        mask[int(rng.integers(num_bb))] = True
    return mask


def mask_caption_tokens(
    ids: np.ndarray,
    attn: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """ALBEF's MLM masking of a padded batch `[CLS] caption [SEP] [PAD]...` (docs/models.md, "Distilled MLM").

    Every position but [PAD] (attn 0) and [CLS] (column 0) is selected with `prob`, [SEP]
    included; a selected token becomes [MASK] (80%), a random id from the whole vocabulary
    (10%) or stays (10%). No minimum: a caption may have no target, as in ALBEF.
    Random-number order: `rng.random((B, L))` row-major, then `rng.integers(0, vocab_size,
    size=K)` for the K random-branch positions, row-major.
    Returns (masked ids [B, L] int64, labels [B, L] int64 with -1 off target).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != np.shape(attn):
        raise ValueError(f"ids and attn must be equal [B, L] arrays, got {ids.shape} and {np.shape(attn)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {prob}")
    u = rng.random(ids.shape)  # [B, L]
    maskable = np.asarray(attn, dtype=bool).copy()
    maskable[:, 0] = False  # [CLS]
    selected = maskable & (u < prob)
    branch = u / prob
    masked = ids.copy()
    masked[selected & (branch < 0.8)] = mask_id
    to_random = selected & (branch >= 0.8) & (branch < 0.9)
    n_random = int(to_random.sum())
    if n_random:
        masked[to_random] = rng.integers(0, vocab_size, size=n_random)
    labels = np.where(selected, ids, -1)
    return masked, labels
