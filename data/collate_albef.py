"""Batch PixelSamples for ALBEF (docs/models.md, "ALBEF"): augmented pictures, captions (mirrored with their
picture), ALBEF's MLM masking, and batch-local image indices for hard negatives.

Every random choice (crop, flip, RandAugment, masks) comes from the collate generator, which
the loader keys by (seed, task, reader, epoch, batch): a resumed run redraws them exactly.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from data.collate import pad_text
from data.masking import mask_caption_tokens
from data.pixels import PixelConfig, eval_pixels, swap_left_right, train_pixels
from data.shards import PixelSample
from data.tasks.records import VE_LABELS


def caption_batch(captions: Sequence[str], tok, max_txt_len: int, sep: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] ids [SEP]` (pretraining) or `[CLS] ids` (`sep=False`: ALBEF's downstream tokenizer) right-padded,
    captions truncated to `max_txt_len` word pieces (ALBEF truncates, it does not drop):
    (input_ids [B, L] int64, attn_mask [B, L] int64)."""
    ids = [np.asarray(tok.encode(c)[:max_txt_len], dtype=np.int64) for c in captions]
    if sep and any(len(i) == 0 for i in ids):
        raise ValueError("a caption has no word pieces; decode_pixel_sample skips such samples")
    input_ids = pad_text(ids, tok.cls_id, tok.sep_id, tok.pad_id)  # [B, L]
    lengths = np.array([len(i) + (2 if sep else 1) for i in ids])  # [B]
    attn = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)  # [B, L]
    input_ids = np.where(attn == 1, input_ids, tok.pad_id)  # without [SEP] its slot is padding
    if not sep:
        input_ids = input_ids[:, :-1]  # the column pad_text kept for [SEP]
        attn = attn[:, :-1]
    return input_ids, attn


_DELETED = re.compile(r"""[,.'!?"()*#:;~]""")
_SPACES = re.compile(r"\s{2,}")
DOWNSTREAM_MAX_WORDS = 30


def pre_caption(caption: str, max_words: int = DOWNSTREAM_MAX_WORDS) -> str:
    """ALBEF's downstream text: lowercased, `,.'!?"()*#:;~` deleted, `-` and `/` made spaces, `<person>`
    made `person`, runs of spaces made one, at most `max_words` words."""
    text = _DELETED.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = _SPACES.sub(" ", text).strip(" \n").split(" ")
    return " ".join(words[:max_words])


def image_index(image_ids: Sequence[str]) -> torch.Tensor:
    """[B] long: a 62-bit hash of each image id, the same on every rank and in every step, so pairs of
    one image share it across the batch and the queue (ALBEF's `idx`: only equality is used; never
    ALBEF's empty-slot value -100, since it is not negative)."""
    digests = [hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest() for i in image_ids]
    return torch.tensor([int.from_bytes(d, "big") >> 2 for d in digests], dtype=torch.long)


def batch_image_index(image_ids: Sequence[str]) -> torch.Tensor:
    """[B] long: equal values for pairs that show the same image (ITM never pairs those as negatives)."""
    return torch.from_numpy(np.unique(np.asarray(image_ids), return_inverse=True)[1].astype(np.int64).reshape(-1))


def augmented_pairs(samples: Sequence[PixelSample], pixels: PixelConfig,
                    rng: np.random.Generator) -> tuple[list[torch.Tensor], list[str]]:
    """Each sample's augmented view [3, S, S] and its caption, mirrored with the picture ("left" <-> "right")."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    views, captions = [], []
    for s in samples:
        view, flipped = train_pixels(s.image, pixels, rng)  # draws in sample order
        views.append(view)
        captions.append(swap_left_right(s.caption) if flipped else s.caption)
    return views, captions


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
    views, captions = augmented_pairs(samples, pixels, rng)
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


def collate_albef_retrieval(samples: Sequence[PixelSample], rng: np.random.Generator, tok, pixels: PixelConfig,
                            max_txt_len: int) -> dict:
    """Retrieval fine-tuning batch (docs/downstream.md, "ALBEF retrieval"): augmented pictures and their
    captions in ALBEF's downstream form (`pre_caption`, `[CLS] ids`, no [SEP]). Keys: pixels, input_ids,
    attn_mask, image_ids (batch-local, equal = same image), image_index (the image's id hash, for the
    queue), n_images (distinct images, host int), n_items."""
    views, captions = augmented_pairs(samples, pixels, rng)
    return _retrieval_batch(views, captions, [s.image_id for s in samples], tok, max_txt_len, "retrieval",
                            keys=[s.key for s in samples])


def _retrieval_batch(views: list, texts: list[str], image_ids: list[str], tok, max_txt_len: int, task: str,
                     **extra) -> dict:
    """Pictures with their texts in ALBEF's downstream form and the image indices retrieval's losses read."""
    input_ids, attn = caption_batch([pre_caption(t) for t in texts], tok, max_txt_len, sep=False)
    return {"pixels": torch.stack(views), "input_ids": torch.from_numpy(input_ids), "attn_mask": torch.from_numpy(attn),
            "image_ids": batch_image_index(image_ids), "image_index": image_index(image_ids),
            "n_images": len(set(image_ids)), "image_keys": image_ids, "n_items": len(views), "task": task, **extra}


def picture_views(samples: Sequence[tuple[dict, list]], pixels: PixelConfig, rng: np.random.Generator,
                  train: bool) -> tuple[list[torch.Tensor], list[str], list[bool]]:
    """(views [3, S, S], texts, mirrored) of one-picture task examples: each picture augmented (`train`; its text
    mirrored with it, "left" <-> "right") or resized; draws in example order."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    views, texts, mirrored = [], [], []
    for example, (image,) in samples:
        view, flipped = train_pixels(image, pixels, rng) if train else (eval_pixels(image, pixels), False)
        views.append(view)
        texts.append(swap_left_right(example["text"]) if flipped else example["text"])
        mirrored.append(flipped)
    return views, texts, mirrored


def collate_albef_grounding(samples: Sequence[tuple[dict, list]], rng: np.random.Generator, tok, pixels: PixelConfig,
                            max_txt_len: int, train: bool = True) -> dict:
    """Grounding batch from (referring expression, [picture]) pairs of an RE task folder: in training the
    retrieval fine-tuning batch (`collate_albef_retrieval`'s keys; the expression mirrored with its picture),
    for scoring the resized picture with its expression and the example ids."""
    views, texts, _ = picture_views(samples, pixels, rng, train)
    return _retrieval_batch(views, texts, [r["image_id"] for r, _ in samples], tok, max_txt_len, "grounding",
                            ids=[r["id"] for r, _ in samples])


ALBEF_VE_LABELS = ("contradiction", "neutral", "entailment")
"""ALBEF's class order for visual entailment (UNITER's and the task folders': contradiction, entailment, neutral)."""
NO_LABEL = -100


def collate_albef_ve(samples: Sequence[tuple[dict, list]], rng: np.random.Generator, tok, pixels: PixelConfig,
                     max_txt_len: int, train: bool = True) -> dict:
    """VE batch from (example, [picture]) pairs of a task folder joined to picture shards: the picture
    augmented (`train`: mirrored with its hypothesis' left/right) or resized (evaluation), the hypothesis in
    ALBEF's downstream form (`pre_caption`, `[CLS] ids`), and the label in ALBEF's order (NO_LABEL without one)."""
    views, texts, _ = picture_views(samples, pixels, rng, train)
    labels = [ALBEF_VE_LABELS.index(VE_LABELS[r["label"]]) if "label" in r else NO_LABEL for r, _ in samples]
    return _classification_batch(samples, views, texts, labels, tok, max_txt_len, "ve")


def collate_albef_nlvr2(samples: Sequence[tuple[dict, list]], rng: np.random.Generator, tok, pixels: PixelConfig,
                        max_txt_len: int, train: bool = True) -> dict:
    """NLVR2 batch from (example, [left picture, right picture]) pairs: `pixels` [2B, 3, S, S] holds every
    left picture, then every right one (one image-encoder pass, split in the model); each picture augmented
    on its own (`train`) or resized. The statement is never mirrored: its "left"/"right" name the pictures,
    not sides within one (ALBEF flips NLVR2 pictures and keeps the text). Labels 1 true, 0 false."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sides: list[list[torch.Tensor]] = [[], []]
    for _, pair in samples:
        for side, image in zip(sides, pair):
            side.append(train_pixels(image, pixels, rng)[0] if train else eval_pixels(image, pixels))
    labels = [int(r["label"]) if "label" in r else NO_LABEL for r, _ in samples]
    return _classification_batch(samples, sides[0] + sides[1], [r["text"] for r, _ in samples], labels, tok,
                                 max_txt_len, "nlvr2")


def collate_albef_vqa(samples: Sequence[tuple[dict, list]], rng: np.random.Generator, tok, pixels: PixelConfig,
                      max_txt_len: int, answers: Sequence[str], train: bool = True) -> dict:
    """VQA batch from (example, [picture]) pairs: the picture augmented (`train`: a mirrored picture mirrors
    "left"/"right" in its question and answers) or resized, the question in ALBEF's downstream form
    (`pre_caption`, `[CLS] ids`) and, in training, every labelled answer of every question flattened:

      answer_ids    [N, La] `[CLS] a [SEP]` (ALBEF appends "[SEP]" to each answer), right-padded
      answer_mask   [N, La]
      answer_owner  [N] the question (batch row) each answer belongs to
      answer_weights [N] ALBEF's weight: the share of annotators who gave it (the record's `weights`;
                    a folder without them weights each answer by its soft score)

    `answers`: the task folder's answer vocabulary (its `labels`)."""
    views, questions, mirrored = picture_views(samples, pixels, rng, train)
    batch = _classification_batch(samples, views, questions, [NO_LABEL] * len(samples), tok, max_txt_len, "vqa")
    del batch["labels"]
    if train:
        texts, owners, weights = [], [], []
        for row, ((example, _), flipped) in enumerate(zip(samples, mirrored)):
            labels = example.get("labels", [])
            texts += [swap_left_right(answers[a]) if flipped else answers[a] for a in labels]
            weights += list(example.get("weights", example.get("scores", [])))
            owners += [row] * len(labels)
        answer_ids, answer_mask = caption_batch(texts, tok, max_txt_len)
        batch.update(answer_ids=torch.from_numpy(answer_ids), answer_mask=torch.from_numpy(answer_mask),
                     answer_owner=torch.tensor(owners, dtype=torch.long),
                     answer_weights=torch.tensor(weights, dtype=torch.float32))
    return batch


def answer_batch(answers: Sequence[str], tok, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate answers of VQA's ranking as the decoder reads them: ([A, La] `[CLS] a [SEP]`, mask)."""
    ids, mask = caption_batch(list(answers), tok, max_len)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _classification_batch(samples, views: list, texts: list[str], labels: list[int], tok, max_txt_len: int,
                          task: str) -> dict:
    input_ids, attn = caption_batch([pre_caption(t) for t in texts], tok, max_txt_len, sep=False)
    return {"pixels": torch.stack(views), "input_ids": torch.from_numpy(input_ids), "attn_mask": torch.from_numpy(attn),
            "labels": torch.tensor(labels, dtype=torch.long), "ids": [r["id"] for r, _ in samples],
            "n_items": len(samples), "task": task}


def collate_albef_ta(samples: Sequence[PixelSample], rng: np.random.Generator, tok, pixels: PixelConfig,
                     max_txt_len: int) -> dict:
    """Text-assignment batch (NLVR2's pretraining step): pretraining's augmented pictures and captions
    (`[CLS] ids [SEP]`, ALBEF's pretraining tokenizer), no masking; the pairs are drawn in the model."""
    views, captions = augmented_pairs(samples, pixels, rng)
    input_ids, attn = caption_batch(captions, tok, max_txt_len)
    return {"pixels": torch.stack(views), "input_ids": torch.from_numpy(input_ids), "attn_mask": torch.from_numpy(attn),
            "keys": [s.key for s in samples], "image_keys": [s.image_id for s in samples], "n_items": len(samples),
            "task": "ta"}


def eval_images(images: Sequence, pixels: PixelConfig) -> torch.Tensor:
    """Evaluation views [B, 3, S, S] (resize only)."""
    return torch.stack([eval_pixels(img, pixels) for img in images])
