"""Batch RegionSamples into UNITER's packed layout (docs/models.md, "UNITER").

The model embeds text `[B, Lt]` and regions `[B, Ni]` separately, concatenates
them to `[B, Lt + Ni, H]` and gathers with `gather_index` into `[B, L, H]`,
where row i is `[txt_i | img_i | pad]` with no holes. Everything index-like is
computed here on the host so the device never syncs on `nonzero`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.masking import mask_regions, mask_tokens
from data.packing import pack_batch
from data.shards import RegionSample


def pad_text(id_lists: Sequence[np.ndarray], cls_id: int, sep_id: int, pad_id: int) -> np.ndarray:
    """`[CLS] ids [SEP]` per row, right-padded with pad_id: [B, Lt] int64."""
    lt = max(len(ids) for ids in id_lists) + 2
    out = np.full((len(id_lists), lt), pad_id, dtype=np.int64)
    for i, ids in enumerate(id_lists):
        out[i, 0] = cls_id
        out[i, 1 : len(ids) + 1] = ids
        out[i, len(ids) + 1] = sep_id
    return out


def pad_regions(feats: Sequence[np.ndarray], poss: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-padded features [B, Ni, D], boxes [B, Ni, 7] and region counts [B] of each row's regions."""
    num_bbs = np.array([len(f) for f in feats], dtype=np.int64)
    ni, dim = int(num_bbs.max()), feats[0].shape[1]
    feat = np.zeros((len(feats), ni, dim), dtype=np.float32)
    pos = np.zeros((len(feats), ni, 7), dtype=np.float32)
    for i, (f, p) in enumerate(zip(feats, poss)):
        feat[i, : num_bbs[i]] = f
        pos[i, : num_bbs[i]] = p
    return feat, pos, num_bbs


def packed_layout(txt_lens: np.ndarray, num_bbs: np.ndarray, max_txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """UNITER's attn_masks and gather_index, both [B, L] int64 with L = max(txt_len + num_bb).

    gather_index starts as arange(L) per row; the region slots of row i,
    txt_len_i .. txt_len_i + nbb_i - 1, point at Lt .. Lt + nbb_i - 1 of the
    concatenated `[txt padded to Lt | img padded to Ni]`.
    """
    total = txt_lens + num_bbs  # [B]
    out_len = int(total.max())
    cols = np.arange(out_len)  # [L]
    attn = (cols[None, :] < total[:, None]).astype(np.int64)  # [B, L]
    gather = np.tile(cols, (len(txt_lens), 1))  # [B, L]
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        gather[i, tl : tl + nbb] = np.arange(max_txt_len, max_txt_len + nbb)
    return attn, gather


def uniter_rows(text_ids: Sequence[np.ndarray], feats: Sequence[np.ndarray], poss: Sequence[np.ndarray],
                tok) -> dict:
    """The keys every UNITER batch has, row i = `[CLS] text_ids[i] [SEP]` with regions feats[i] / poss[i]."""
    input_ids = pad_text(text_ids, tok.cls_id, tok.sep_id, tok.pad_id)  # [B, Lt]
    txt_lens = np.array([len(ids) + 2 for ids in text_ids], dtype=np.int64)  # [B]
    feat, pos, num_bbs = pad_regions(feats, poss)
    attn, gather = packed_layout(txt_lens, num_bbs, input_ids.shape[1])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.arange(input_ids.shape[1], dtype=torch.long).unsqueeze(0),  # [1, Lt]
        "txt_lens": torch.from_numpy(txt_lens),
        "img_feat": torch.from_numpy(feat),  # [B, Ni, D]
        "img_pos_feat": torch.from_numpy(pos),  # [B, Ni, 7]
        "num_bbs": torch.from_numpy(num_bbs),
        "attn_masks": torch.from_numpy(attn),  # [B, L]
        "gather_index": torch.from_numpy(gather),  # [B, L]
    }


def _batch(text_ids: Sequence[np.ndarray], images: Sequence[RegionSample],
           samples: Sequence[RegionSample], tok, task: str) -> dict:
    """The keys every task shares; `images[i]` is the image paired with text i."""
    batch = uniter_rows(text_ids, [s.img_feat for s in images], [s.img_pos for s in images], tok)
    batch.update(keys=[s.key for s in samples], image_ids=[s.image_id for s in samples], task=task)
    return batch


def _check_samples(samples: Sequence[RegionSample]) -> None:
    if not samples:
        raise ValueError("cannot collate an empty batch")
    dims = {s.img_feat.shape[1] for s in samples}
    if len(dims) > 1:
        raise ValueError(f"samples of one batch must share img_dim, got {sorted(dims)}")


def collate_mlm(samples: Sequence[RegionSample], rng: np.random.Generator, tok, mlm_prob: float = 0.15,
                pack_len: int = 0) -> dict:
    """MLM batch: text masked per sample in order, regions untouched (conditional masking).

    Adds txt_labels [B, Lt] (-1 off target), and mlm_index / mlm_targets [N]:
    the flat positions i * L + j of the targets in the packed [B, L] layout
    (text occupies the same columns there as in input_ids) and their ids.
    `pack_len` > 0: packed rows (data/packing.py), mlm_index then indexes the [R, pack_len] rows.
    """
    _check_samples(samples)
    masked, labels = [], []
    for s in samples:
        m, lab = mask_tokens(s.input_ids, rng, tok.mask_id, tok.first_random_id, tok.vocab_size, mlm_prob)
        masked.append(m)
        labels.append(lab)
    batch = _batch(masked, samples, samples, tok, "mlm")
    txt_labels = pad_text(labels, -1, -1, -1)  # [B, Lt]; CLS/SEP/pad are never targets
    rows, cols = np.nonzero(txt_labels != -1)  # host-side, row-major
    out_len = batch["attn_masks"].shape[1]
    batch["txt_labels"] = torch.from_numpy(txt_labels)
    batch["mlm_index"] = torch.from_numpy((rows * out_len + cols).astype(np.int64))  # [N]
    batch["mlm_targets"] = torch.from_numpy(txt_labels[rows, cols])  # [N]
    batch["n_items"] = int(len(rows))
    return pack_batch(batch, pack_len)


def _negative_partner(i: int, samples: Sequence[RegionSample], rng: np.random.Generator,
                      neg_prob: float) -> Optional[int]:
    """Index of the sample whose image replaces text i's, or None to keep the pair positive."""
    if rng.random() >= neg_prob:
        return None
    candidates = [j for j, s in enumerate(samples) if s.image_id != samples[i].image_id]
    if not candidates:  # every sample shows the same image: a swap would be a false negative
        return None
    return candidates[int(rng.integers(len(candidates)))]


def collate_itm(samples: Sequence[RegionSample], rng: np.random.Generator, tok, neg_prob: float = 0.5,
                pack_len: int = 0) -> dict:
    """ITM batch: each text keeps its image (target 1) or, with `neg_prob`, gets the
    original image of another sample with a different image_id (target 0).

    `image_ids` / `keys` stay those of the texts' own samples. Nothing is masked.
    `pack_len` > 0: packed rows (data/packing.py).
    """
    _check_samples(samples)
    if not 0.0 <= neg_prob <= 1.0:
        raise ValueError(f"neg_prob must be in [0, 1], got {neg_prob}")
    partners = [_negative_partner(i, samples, rng, neg_prob) for i in range(len(samples))]
    images = [samples[i if j is None else j] for i, j in enumerate(partners)]
    batch = _batch([s.input_ids for s in samples], images, samples, tok, "itm")
    batch["itm_targets"] = torch.tensor([1 if j is None else 0 for j in partners], dtype=torch.long)  # [B]
    batch["n_items"] = len(samples)
    return pack_batch(batch, pack_len)


def _check_candidates(candidates) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1 (negative images scored per text), "
                         f"got {candidates!r}; set data.uniter.itm_hard_candidates to 1 or more")


def _first_sample_per_image(samples: Sequence[RegionSample]) -> dict[str, int]:
    """image_id -> index of its first sample, in batch order."""
    first: dict[str, int] = {}
    for j, s in enumerate(samples):
        first.setdefault(s.image_id, j)
    return first


def _hard_candidates(i: int, samples: Sequence[RegionSample], first: dict[str, int],
                     rng: np.random.Generator, candidates: int) -> list[int]:
    """Up to `candidates` sample indices showing distinct images other than text i's, drawn
    uniformly without replacement; one representative sample (`first`, the first) per
    image_id, so the same image is never scored twice for a text."""
    eligible = [j for img, j in first.items() if img != samples[i].image_id]
    if not eligible:  # every sample shows text i's image: any swap would be a false negative
        return []
    picks = rng.choice(len(eligible), size=min(candidates, len(eligible)), replace=False)
    return [eligible[int(p)] for p in picks]


def collate_itm_hard(samples: Sequence[RegionSample], rng: np.random.Generator, tok,
                     candidates: int = 7) -> dict:
    """Hard-negative ITM batch (UNITER fine-tuning style): every text with its own image,
    plus up to `candidates` negative images per text for the objective to score.

    Rows of every per-row tensor (input_ids, txt_lens, img_feat, img_pos_feat, num_bbs,
    attn_masks, gather_index, itm_targets) are R = B + sum_i k_i pairs: the B positives
    (text i, image i) first, then the candidates text-major (text i with candidate image j).
    `keys` / `image_ids` stay those of the B texts' own samples. Adds:

      itm_targets      [R] long, 1 for the B positives, 0 for the candidate rows
      hard_candidates  [B, k] long, row indices of text i's candidates, -1 past its k_i
                       (k = max k_i; a text without another image_id has an all -1 row)
      hard_texts       [M] long, the texts with >= 1 candidate (host-computed, so the
                       objective picks negatives with static shapes, no device sync)
      n_items          B + M: the positives plus one hardest negative per text in hard_texts

    Never packed into multi-sample rows (data.uniter.pack_len): the objective selects rows of
    it on the device (`take_rows`), which needs one sample per row.
    """
    _check_samples(samples)
    _check_candidates(candidates)
    b = len(samples)
    first = _first_sample_per_image(samples)
    picks = [_hard_candidates(i, samples, first, rng, int(candidates)) for i in range(b)]
    texts = [s.input_ids for s in samples] + [samples[i].input_ids for i, js in enumerate(picks) for _ in js]
    images = list(samples) + [samples[j] for js in picks for j in js]
    batch = _batch(texts, images, samples, tok, "itm-hard")
    index = np.full((b, max(len(js) for js in picks)), -1, dtype=np.int64)  # [B, k]
    starts = b + np.cumsum([0] + [len(js) for js in picks])  # first candidate row per text
    for i, js in enumerate(picks):
        index[i, : len(js)] = np.arange(starts[i], starts[i] + len(js))
    has_negative = [i for i, js in enumerate(picks) if js]
    batch["itm_targets"] = torch.tensor([1] * b + [0] * (len(images) - b), dtype=torch.long)  # [R]
    batch["hard_candidates"] = torch.from_numpy(index)
    batch["hard_texts"] = torch.tensor(has_negative, dtype=torch.long)  # [M]
    batch["n_items"] = b + len(has_negative)
    return batch


def collate_mrm(samples: Sequence[RegionSample], rng: np.random.Generator, tok, mrm_prob: float = 0.15,
                task: str = "mrm", pack_len: int = 0) -> dict:
    """Masked-region batch for MRFR, MRC and MRC-kl alike (docs/models.md, "Region masking").

    Conditional masking: the text is untouched; per sample, in order, the
    regions are drawn with `mask_regions` (p = mrm_prob, at least one). The
    input `img_feat` has the masked rows set to 0 (boxes unchanged; the model
    adds `mask_embedding.weight[1]` where `img_masks` is set). Adds:

      img_masks        [B, Ni] bool, False at pads
      mrm_index        [N] long, flat packed positions i * L + txt_len_i + j of
                       every masked region j of example i, row-major (i, then j)
      mrfr_targets     [N, img_dim] float32, original features, same order
      mrc_soft_labels  [N, label_dim] float32, soft labels, same order
      n_items          N, the number of masked regions

    `task` only labels the batch (e.g. "mrfr", "mrc", "mrc-kl"). `pack_len` > 0: packed rows
    (data/packing.py), mrm_index then indexes the [R, pack_len] rows.
    """
    _check_samples(samples)
    label_dims = {s.soft_labels.shape[1] for s in samples}
    if len(label_dims) > 1:
        raise ValueError(f"samples of one batch must share label_dim, got {sorted(label_dims)}")
    masks = [mask_regions(len(s.img_feat), rng, mrm_prob) for s in samples]
    batch = _batch([s.input_ids for s in samples], samples, samples, tok, task)
    bsz, ni = batch["img_feat"].shape[:2]
    img_masks = np.zeros((bsz, ni), dtype=bool)  # [B, Ni]
    for i, m in enumerate(masks):
        img_masks[i, : len(m)] = m
    rows, cols = np.nonzero(img_masks)  # host-side, row-major: same order as the targets below
    out_len = batch["attn_masks"].shape[1]
    txt_lens = batch["txt_lens"].numpy()
    mrm_index = rows * out_len + txt_lens[rows] + cols  # [N]
    targets = np.concatenate([s.img_feat[m] for s, m in zip(samples, masks)]).astype(np.float32)  # [N, D]
    soft = np.concatenate([s.soft_labels[m] for s, m in zip(samples, masks)]).astype(np.float32)  # [N, K]
    masks_t = torch.from_numpy(img_masks)
    batch["img_feat"] = batch["img_feat"].masked_fill(masks_t[..., None], 0.0)  # [B, Ni, D]
    batch["img_masks"] = masks_t
    batch["mrm_index"] = torch.from_numpy(mrm_index.astype(np.int64))
    batch["mrfr_targets"] = torch.from_numpy(np.ascontiguousarray(targets))
    batch["mrc_soft_labels"] = torch.from_numpy(np.ascontiguousarray(soft))
    batch["n_items"] = int(len(rows))
    return pack_batch(batch, pack_len)
