"""Batch PixelSamples for ALBEF (docs/models.md, "ALBEF"): augmented pictures, captions (mirrored with their
picture), ALBEF's MLM masking, and batch-local image indices for hard negatives.

Every random choice (crop, flip, RandAugment, masks) comes from the collate generator, which
the loader keys by (seed, task, reader, epoch, batch): a resumed run redraws them exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.collate import pad_text
from data.masking import mask_caption_tokens
from data.pixels import PixelConfig, eval_pixels, swap_left_right, train_pixels
from data.shards import PixelSample


def caption_batch(captions: Sequence[str], tok, max_txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] ids [SEP]` right-padded, captions truncated to `max_txt_len` word pieces (ALBEF
    truncates, it does not drop): (input_ids [B, L] int64, attn_mask [B, L] int64)."""
    ids = [np.asarray(tok.encode(c)[:max_txt_len], dtype=np.int64) for c in captions]
    if any(len(i) == 0 for i in ids):
        raise ValueError("a caption has no word pieces; decode_pixel_sample skips such samples")
    input_ids = pad_text(ids, tok.cls_id, tok.sep_id, tok.pad_id)  # [B, L]
    lengths = np.array([len(i) + 2 for i in ids])  # [B]
    attn = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)  # [B, L]
    return input_ids, attn


def batch_image_index(image_ids: Sequence[str]) -> torch.Tensor:
    """[B] long: equal values for pairs that show the same image (ITM never pairs those as negatives)."""
    return torch.from_numpy(np.unique(np.asarray(image_ids), return_inverse=True)[1].astype(np.int64).reshape(-1))


def collate_albef(samples: Sequence[PixelSample], rng: np.random.Generator, tok, pixels: PixelConfig,
                  max_txt_len: int, mlm_prob: float = 0.15) -> dict:
    """Training batch. Keys:

      pixels         [B, 3, S, S] float32, augmented and normalised
      input_ids      [B, L] caption ids (of the mirrored caption where the picture was mirrored)
      attn_mask      [B, L] 1 on [CLS] caption [SEP]
      mlm_input_ids  [B, L] the same ids with ALBEF's masking
      mlm_index      [N] flat positions i * L + j of the MLM targets (host-computed: no device sync)
      mlm_targets    [N] their original ids
      image_ids      [B] long batch-local image index (equal = same image_id)
      n_items        B
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    views, captions = [], []
    for s in samples:
        view, flipped = train_pixels(s.image, pixels, rng)  # draws in sample order
        views.append(view)
        captions.append(swap_left_right(s.caption) if flipped else s.caption)
    input_ids, attn = caption_batch(captions, tok, max_txt_len)
    masked, labels = mask_caption_tokens(input_ids, attn, rng, tok.mask_id, tok.vocab_size, mlm_prob)
    rows, cols = np.nonzero(labels != -1)  # row-major
    return {
        "pixels": torch.stack(views),
        "input_ids": torch.from_numpy(input_ids),
        "attn_mask": torch.from_numpy(attn),
        "mlm_input_ids": torch.from_numpy(masked),
        "mlm_index": torch.from_numpy((rows * input_ids.shape[1] + cols).astype(np.int64)),
        "mlm_targets": torch.from_numpy(labels[rows, cols]),
        "image_ids": batch_image_index([s.image_id for s in samples]),
        "keys": [s.key for s in samples],
        "image_keys": [s.image_id for s in samples],
        "n_items": len(samples),
        "task": "albef",
    }


def eval_images(images: Sequence, pixels: PixelConfig) -> torch.Tensor:
    """Evaluation views [B, 3, S, S] (resize only)."""
    return torch.stack([eval_pixels(img, pixels) for img in images])
