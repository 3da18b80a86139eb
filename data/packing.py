"""Sequence packing of UNITER batches: several samples per row (docs/data.md, "Packed rows").

Collate lays sample i out as row i of `[B, L]`, `[txt_i | img_i | pad]` (data/collate.py), so
every row pays for the batch's longest sample: with 10-100 regions per image about a third of
the encoder's positions are padding. Packing puts the n_i = txt_len_i + num_bb_i valid
positions of the samples into R rows of `pack_len` positions, each sample whole and
contiguous in one row, and the encoder attends within a sample only (block-diagonal mask, trainer/models/bert.py). The
embeddings are still computed per sample (text position ids restart at each [CLS]), so the
valid positions get the same states as without packing.

Keys `pack_batch` adds (R rows, Lp = pack_len, L the per-sample row length):

  pack_index    [R, Lp] long, the per-sample flat position i * L + j each packed slot
                holds; 0 at pads (any valid position will do: pads attend to pads only)
  unpack_index  [B, L] long, the packed flat position r * Lp + p of each per-sample slot;
                0 past the sample's length (those slots are padding in both layouts)
  segment_ids   [R, Lp] long, the sample each slot holds, -1 at pads
  cls_index     [B] long, the packed flat position of each sample's [CLS]

and the flat positions the heads gather (`mlm_index`, `mrm_index`) are moved into the
packed layout, so `masked_gather(hidden [R, Lp, H], index)` picks the same positions.
Everything is host-side numpy/torch, run in the DataLoader workers; no randomness.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PACK_MULTIPLE = 8
# Flat per-sample positions i * L + j that the heads gather: moved into the packed layout.
FLAT_POSITION_KEYS = ("mlm_index", "mrm_index")


def check_pack_len(pack_len: int, name: str = "data.uniter.pack_len") -> None:
    """ValueError unless `pack_len` is 0 (off) or a positive multiple of 8 (rows suit tensor cores)."""
    if isinstance(pack_len, bool) or not isinstance(pack_len, (int, np.integer)) \
            or pack_len < 0 or pack_len % PACK_MULTIPLE:
        raise ValueError(f"{name} must be 0 (no packing) or a positive multiple of {PACK_MULTIPLE}, "
                         f"got {pack_len!r}; e.g. 128 or 256")


def round_up(n: int, multiple: int = PACK_MULTIPLE) -> int:
    return -(-int(n) // multiple) * multiple


def pack_rows(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """First-fit decreasing: the sample indices of each row, their lengths summing to <= pack_len.

    Longest sample first (ties in batch order), each into the first row with room for it, else
    a new row; inside a row the samples keep batch order. Deterministic, no randomness.
    """
    lengths = [int(n) for n in lengths]
    longest = max(lengths, default=0)
    if longest > pack_len:
        raise ValueError(f"a sample of {longest} positions ([CLS] + word pieces + [SEP] + regions) does not fit "
                         f"a packed row of data.uniter.pack_len={pack_len}; raise data.uniter.pack_len to at "
                         f"least {round_up(longest)} (or 0 to turn packing off)")
    room = np.empty(len(lengths), dtype=np.int64)  # free positions per row; at most one row per sample
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):  # stable: ties keep batch order
        fits = np.flatnonzero(room[: len(rows)] >= lengths[i])
        if fits.size:
            rows[fits[0]].append(i)
            room[fits[0]] -= lengths[i]
        else:
            rows.append([i])
            room[len(rows) - 1] = pack_len - lengths[i]
    return [sorted(r) for r in rows]


def packed_index(lengths: Sequence[int], rows: Sequence[Sequence[int]], out_len: int,
                 pack_len: int) -> dict[str, np.ndarray]:
    """pack_index, unpack_index, segment_ids and cls_index (module docstring) of a row plan."""
    b = len(lengths)
    pack_index = np.zeros((len(rows), pack_len), dtype=np.int64)  # [R, Lp]
    segment_ids = np.full((len(rows), pack_len), -1, dtype=np.int64)  # [R, Lp]
    unpack_index = np.zeros((b, out_len), dtype=np.int64)  # [B, L]
    cls_index = np.zeros(b, dtype=np.int64)  # [B]
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = int(lengths[i])
            slots = np.arange(start, start + n)  # [n_i]
            pack_index[r, slots] = i * out_len + np.arange(n)
            segment_ids[r, slots] = i
            unpack_index[i, :n] = r * pack_len + slots
            cls_index[i] = r * pack_len + start
            start += n
        assert start <= pack_len, (start, pack_len)
    return {"pack_index": pack_index, "unpack_index": unpack_index, "segment_ids": segment_ids,
            "cls_index": cls_index}


def pack_batch(batch: dict, pack_len: int) -> dict:
    """A collated UNITER batch with its samples packed into rows of `pack_len` (module docstring).

    The per-sample keys (input_ids, img_feat, gather_index, attn_masks, ...) are kept: the model
    embeds per sample as before and only then moves the valid positions into the packed rows.
    """
    check_pack_len(pack_len)
    if not pack_len:
        return batch
    lengths = (batch["txt_lens"] + batch["num_bbs"]).tolist()  # [B]
    out_len = batch["attn_masks"].shape[1]
    layout = {k: torch.from_numpy(v) for k, v in
              packed_index(lengths, pack_rows(lengths, pack_len), out_len, pack_len).items()}
    out = dict(batch)
    flat = layout["unpack_index"].reshape(-1)  # [B * L]
    for key in FLAT_POSITION_KEYS:
        if key in batch:
            out[key] = flat.index_select(0, batch[key])  # [N]
    out.update(layout)
    return out

