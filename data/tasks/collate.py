"""Batch downstream examples into UNITER's packed layout (docs/downstream.md, "Batches").

A collate takes `samples`: a list of (example record, [Regions of each image it names]) — one
image, NLVR2 two ([left, right]) — plus a numpy Generator for the draws some tasks make, and
returns the common keys (data/collate.py's conventions: `[CLS] words [SEP]`, rows
`[txt | img | pad]`, docs/models.md "UNITER") plus the task's own. Every index-like tensor is
computed here on the host so the model never syncs; everything is deterministic given `rng`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.collate import uniter_rows
from data.tasks.features import Regions
from data.tasks.records import NUM_CHOICES, VE_LABELS, image_ids_of

NLVR2_VARIANTS = ("paired", "paired-attn", "triplet")
RE_HARD_PROB = 0.3
"""RE rank loss: share of examples whose negative is the best-scoring non-target (docs/models.md)."""
VCR_TYPES = (0, 2, 3)
"""VCR text type ids: [CLS] and question, [SEP] + answer, [SEP] + rationale (docs/downstream.md)."""

Sample = tuple[dict, Sequence[Regions]]


# ------------------------------------------------------------------ shared pieces

def _check_common(items: Sequence, max_txt_len: int) -> None:
    if not items:
        raise ValueError("cannot collate an empty batch")
    if isinstance(max_txt_len, bool) or not isinstance(max_txt_len, (int, np.integer)) or max_txt_len < 1:
        raise ValueError(f"max_txt_len must be an integer >= 1 (word pieces kept per text), got "
                         f"{max_txt_len!r}; set data.max_txt_len")


def _check_batch(samples: Sequence[Sample], n_images: int, max_txt_len: int) -> None:
    _check_common(samples, max_txt_len)
    for ex, regions in samples:
        assert len(regions) == n_images, (ex.get("id"), len(regions), n_images)  # the loader joins them
        assert [r.image_id for r in regions] == image_ids_of(ex)[:n_images], ex.get("id")


def _words(tok, text: str, max_txt_len: int) -> np.ndarray:
    """Word-piece ids of `text` without [CLS]/[SEP], cut to max_txt_len: [n] int64."""
    return np.asarray(tok.encode(text)[:max_txt_len], dtype=np.int64)


def _check_dims(feats: Sequence[np.ndarray]) -> None:
    dims = sorted({int(f.shape[1]) for f in feats})
    if len(dims) > 1:
        raise ValueError(f"regions of one batch must share img_dim, got {dims}; the region shard folders "
                         "named by finetune.features mix feature sizes")


def _layout(words: Sequence[np.ndarray], feats: Sequence[np.ndarray], poss: Sequence[np.ndarray],
            tok, ids: list, task: str) -> dict:
    """The common keys for rows (words[i], regions feats[i]/poss[i]); `ids` one per example."""
    _check_dims(feats)
    return {**uniter_rows(words, feats, poss, tok), "ids": ids, "task": task}


def _single(samples: Sequence[Sample], tok, max_txt_len: int, task: str) -> dict:
    """One row per example: its `text` with its one image."""
    _check_batch(samples, 1, max_txt_len)
    words = [_words(tok, ex["text"], max_txt_len) for ex, _ in samples]
    regions = [r[0] for _, r in samples]
    return _layout(words, [r.img_feat for r in regions], [r.img_pos for r in regions], tok,
                   [ex["id"] for ex, _ in samples], task)


def _labelled(samples: Sequence[Sample], field: str, task: str) -> bool:
    """Whether the batch carries `field` (all examples) or not (none: a test split)."""
    have = sum(field in ex for ex, _ in samples)
    if 0 < have < len(samples):
        raise ValueError(f"{task} batch mixes examples with and without `{field}` ({have} of {len(samples)} "
                         "have it); a task folder must be all labelled (train/val) or all unlabelled (test)")
    return have > 0


# ------------------------------------------------------------------ VQA, VE

def collate_vqa(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int,
                num_answers: int) -> dict:
    """VQA batch: one row per question; `targets` [B, A] float32 with each example's `scores`
    scattered at its `labels` (an example without them: a zero row); no `targets` when no
    example has labels (test split). n_items B. `rng` is unused (no draws)."""
    if isinstance(num_answers, bool) or not isinstance(num_answers, (int, np.integer)) or num_answers < 1:
        raise ValueError(f"num_answers must be an integer >= 1 (the answer vocabulary's size, the "
                         f"manifest's `labels`), got {num_answers!r}")
    batch = _single(samples, tok, max_txt_len, "vqa")
    if any("labels" in ex for ex, _ in samples):
        targets = np.zeros((len(samples), num_answers), dtype=np.float32)  # [B, A]
        for i, (ex, _) in enumerate(samples):
            labels, scores = ex.get("labels", []), ex.get("scores", [])
            if any(not 0 <= a < num_answers for a in labels):
                raise ValueError(f"VQA example {ex['id']!r} has answer labels {labels} outside [0, {num_answers}); "
                                 "num_answers must be the length of the task folder's manifest `labels`")
            targets[i, labels] = scores
        batch["targets"] = torch.from_numpy(targets)
    batch["n_items"] = len(samples)
    return batch


def collate_ve(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int) -> dict:
    """SNLI-VE batch: one row per hypothesis; `targets` [B, 3] float32 one-hot of `label`
    (contradiction 0, entailment 1, neutral 2), absent on a test split. n_items B."""
    batch = _single(samples, tok, max_txt_len, "ve")
    if _labelled(samples, "label", "ve"):
        labels = np.array([ex["label"] for ex, _ in samples], dtype=np.int64)  # [B]
        batch["targets"] = torch.from_numpy(np.eye(len(VE_LABELS), dtype=np.float32)[labels])  # [B, 3]
    batch["n_items"] = len(samples)
    return batch


# ------------------------------------------------------------------ retrieval

def _check_negative_size(negative_size) -> None:
    if isinstance(negative_size, bool) or not isinstance(negative_size, (int, np.integer)) or negative_size < 1:
        raise ValueError(f"negative_size must be an integer >= 1 (negatives per side of each caption), got "
                         f"{negative_size!r}; set finetune.negative_size")


def _retrieval_negatives(i: int, samples: Sequence[Sample], first: dict[str, int], rng: np.random.Generator,
                         k: int) -> tuple[list[int], list[int]]:
    """Sample indices of caption i's K negative images (distinct image_ids other than its own; one
    representative sample per image) and K negative captions (captions of other images)."""
    own = samples[i][0]["image_id"]
    images = [j for img, j in first.items() if img != own]
    if len(images) < k:
        raise ValueError(f"retrieval training needs {k} other images per caption (finetune.negative_size) "
                         f"but this micro-batch shows only {len(images)} images besides caption "
                         f"{samples[i][0]['id']!r}'s; set data.micro_batch_size above finetune.negative_size "
                         "(a batch of B captions shows at most B images) or lower finetune.negative_size")
    captions = [j for j, (ex, _) in enumerate(samples) if ex["image_id"] != own]
    neg_images = [images[int(p)] for p in rng.choice(len(images), size=k, replace=False)]
    neg_captions = [captions[int(p)] for p in rng.choice(len(captions), size=k, replace=False)]
    return neg_images, neg_captions


def collate_retrieval_train(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int,
                            negative_size: int) -> dict:
    """Retrieval training batch with random in-batch negatives: per caption t of image I the group
    [(t, I), (t, I-neg_1..K), (t-neg_1..K, I)] of G = 1 + 2K rows, groups flattened in batch
    order. Negatives are drawn with `rng` (per caption: images, then captions) from the batch's
    other images and captions of other images. Adds `sample_size` G; n_items B * (G - 1)."""
    _check_negative_size(negative_size)
    _check_batch(samples, 1, max_txt_len)
    k = int(negative_size)
    first: dict[str, int] = {}
    for j, (ex, _) in enumerate(samples):
        first.setdefault(ex["image_id"], j)
    words = [_words(tok, ex["text"], max_txt_len) for ex, _ in samples]
    texts, images = [], []  # per row: the sample giving its caption, and the one giving its image
    for i in range(len(samples)):
        neg_images, neg_captions = _retrieval_negatives(i, samples, first, rng, k)
        texts += [i] * (1 + k) + neg_captions
        images += [i] + neg_images + [i] * k
    regions = [samples[j][1][0] for j in images]
    batch = _layout([words[t] for t in texts], [r.img_feat for r in regions], [r.img_pos for r in regions],
                    tok, [ex["id"] for ex, _ in samples], "retrieval")
    batch["sample_size"] = 1 + 2 * k
    batch["n_items"] = len(samples) * 2 * k
    return batch


def collate_retrieval_pairs(pairs: Sequence[tuple[dict, Regions]], *, tok, max_txt_len: int) -> dict:
    """Retrieval scoring batch: one row per (caption example, image Regions) pair, in order.
    Adds `pairs` [(caption id, image id)]; `ids` the caption ids, one per row; n_items len."""
    _check_common(pairs, max_txt_len)  # the image is any image, not the caption's own
    words = [_words(tok, ex["text"], max_txt_len) for ex, _ in pairs]
    batch = _layout(words, [r.img_feat for _, r in pairs], [r.img_pos for _, r in pairs], tok,
                    [ex["id"] for ex, _ in pairs], "retrieval")
    batch["pairs"] = [(ex["id"], r.image_id) for ex, r in pairs]
    batch["n_items"] = len(pairs)
    return batch


# ------------------------------------------------------------------ NLVR2

def _img_types(spans: Sequence[Sequence[tuple[int, int]]], ni: int) -> np.ndarray:
    """Region type ids [B, Ni]: row i holds, in order, `count` regions of `type` per (count, type)
    of spans[i], then 0 (pad)."""
    out = np.zeros((len(spans), ni), dtype=np.int64)  # [B, Ni]
    for i, row in enumerate(spans):
        start = 0
        for count, kind in row:
            out[i, start : start + count] = kind
            start += count
    return out


def collate_nlvr2(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int,
                  variant: str) -> dict:
    """NLVR2 batch, `samples` = (example, [left, right]). paired / paired-attn: two rows per
    example, interleaved (ex0 text + left, ex0 text + right, ex1 ...); triplet: one row
    `text | left regions | right regions`. `img_type_ids` 1 on left regions, 2 on right ones
    (text type 0: no txt_type_ids). `targets` [n] long from `label` (1 = True), absent on a test
    split; n_items n. `rng` is unused (no draws)."""
    if variant not in NLVR2_VARIANTS:
        raise ValueError(f"unknown NLVR2 variant {variant!r}; set finetune.nlvr2_variant to one of "
                         f"{', '.join(NLVR2_VARIANTS)}")
    _check_batch(samples, 2, max_txt_len)
    words = [_words(tok, ex["text"], max_txt_len) for ex, _ in samples]
    ids = [ex["id"] for ex, _ in samples]
    if variant == "triplet":
        feats = [np.concatenate([left.img_feat, right.img_feat]) for _, (left, right) in samples]
        poss = [np.concatenate([left.img_pos, right.img_pos]) for _, (left, right) in samples]
        spans = [[(left.num_bb, 1), (right.num_bb, 2)] for _, (left, right) in samples]
        batch = _layout(words, feats, poss, tok, ids, "nlvr2")
    else:
        rows = [r for _, pair in samples for r in pair]  # ex0-L, ex0-R, ex1-L, ...
        spans = [[(r.num_bb, 1 + (j % 2))] for j, r in enumerate(rows)]
        batch = _layout([w for w in words for _ in range(2)], [r.img_feat for r in rows],
                        [r.img_pos for r in rows], tok, ids, "nlvr2")
    batch["img_type_ids"] = torch.from_numpy(_img_types(spans, batch["img_feat"].shape[1]))  # [R, Ni]
    if _labelled(samples, "label", "nlvr2"):
        batch["targets"] = torch.tensor([ex["label"] for ex, _ in samples], dtype=torch.long)  # [n]
    batch["n_items"] = len(samples)
    return batch


# ------------------------------------------------------------------ referring expressions

def _re_rank_draws(targets: np.ndarray, num_bbs: np.ndarray, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The RE rank loss's host draws: hard [n] bool (True with prob 0.3: use the best-scoring
    non-target) and random [n] long (a uniform non-target index in [0, nbb)). An image with a
    single region has no non-target: its draw is the target itself, a valid index whose hinge is
    the constant margin (no gradient), as the hard pick's is when no other region exists."""
    hard = rng.random(len(targets)) < RE_HARD_PROB  # [n]
    draw = rng.integers(0, np.maximum(num_bbs - 1, 1))  # [n] in [0, nbb - 1)
    random = draw + (draw >= targets)  # skip the target: uniform over the nbb - 1 others
    random = np.where(num_bbs > 1, random, targets).astype(np.int64)
    return hard, random


def collate_re(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int) -> dict:
    """Referring-expression batch: one row per expression with its image's regions. Adds
    `targets` [n] long (the referred region's index), `obj_masks` [n, max nbb] bool (True = pad),
    and the rank loss's draws `re_rank_hard` [n] bool and `re_rank_random` [n] long
    (docs/models.md). n_items n."""
    batch = _single(samples, tok, max_txt_len, "re")
    targets = np.array([ex["target"] for ex, _ in samples], dtype=np.int64)  # [n]
    num_bbs = batch["num_bbs"].numpy()  # [n]
    assert (targets < num_bbs).all(), "the loader drops examples whose target is not a region of the image"
    ni = batch["img_feat"].shape[1]
    obj_masks = np.arange(ni)[None, :] >= num_bbs[:, None]  # [n, Ni]
    hard, random = _re_rank_draws(targets, num_bbs, rng)
    batch["targets"] = torch.from_numpy(targets)
    batch["obj_masks"] = torch.from_numpy(obj_masks)
    batch["re_rank_hard"] = torch.from_numpy(hard)
    batch["re_rank_random"] = torch.from_numpy(random)
    batch["n_items"] = len(samples)
    return batch


# ------------------------------------------------------------------ VCR

def _truncate(sections: list[list[int]], limit: int) -> list[list[int]]:
    """Cut the sections' word pieces to `limit` in all: from the end of the first section
    (question), then the next ones, keeping each non-empty; only if that is not enough, empty
    them in the same order."""
    out = [list(s) for s in sections]
    for floor in (1, 0):
        for s in out:
            excess = sum(map(len, out)) - limit
            if excess <= 0:
                return out
            keep = max(floor, len(s) - excess)
            del s[min(keep, len(s)):]
    return out


def _vcr_row(sections: list[list[int]], sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Words between [CLS] and the last [SEP] (`q [SEP] a` or `q [SEP] a [SEP] r`) [n] and the
    type ids of the whole row `[CLS] ... [SEP]` [n + 2]: 0 on [CLS] and q, 2 from the [SEP]
    after q through a, 3 from the [SEP] after a; the last [SEP] takes the last section's type."""
    words, types = [], [VCR_TYPES[0]]  # [CLS]
    for k, s in enumerate(sections):
        words += ([sep_id] if k else []) + s
        types += [VCR_TYPES[k]] * (len(s) + (1 if k else 0))
    types.append(VCR_TYPES[len(sections) - 1])  # the final [SEP]
    return np.asarray(words, dtype=np.int64), np.asarray(types, dtype=np.int64)


def _vcr_rows(ex: dict, tok, max_txt_len: int) -> tuple[list[np.ndarray], list[np.ndarray], Optional[int]]:
    """The example's 4 rows (words, types) and its right choice (None without a label)."""
    mode = ex.get("mode")
    if mode not in ("qa", "qar"):
        raise ValueError(f"VCR example {ex.get('id')!r} has mode {mode!r}; the loader must set `mode` to "
                         "'qa' (Q->A) or 'qar' (QA->R) on every example")
    question = tok.encode(ex["question"])
    if mode == "qa":
        choices = [[question, tok.encode(a)] for a in ex["answers"]]
        label = ex.get("answer_label")
    else:
        if "answer_label" not in ex:
            raise ValueError(f"VCR QA->R example {ex.get('id')!r} has no answer_label: the loader must set "
                             "the answer a* the rationales follow (on test, one example per candidate answer)")
        answer = tok.encode(ex["answers"][ex["answer_label"]])
        choices = [[question, answer, tok.encode(r)] for r in ex["rationales"]]
        label = ex.get("rationale_label")
    assert len(choices) == NUM_CHOICES  # records.py checks 4 answers and 4 rationales
    rows = [_vcr_row(_truncate(c, max_txt_len), tok.sep_id) for c in choices]
    return [w for w, _ in rows], [t for _, t in rows], label


def collate_vcr(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int) -> dict:
    """VCR batch: 4 rows per question, question-major, by each example's `mode`: "qa" rows
    `[CLS] q [SEP] a_i [SEP]`, "qar" rows `[CLS] q [SEP] a* [SEP] r_j [SEP]` (a* =
    answers[answer_label]). `max_txt_len` caps each row's word pieces in all (specials not
    counted; the question is cut first). Adds `txt_type_ids` [4q, Lt] (0 / 2 / 3, pads 0) and
    `targets` [4q] long, 1 on the right choice (answer_label / rationale_label; absent on a test
    split). n_items 4q. `rng` is unused (no draws)."""
    _check_batch(samples, 1, max_txt_len)
    words, types, labels = [], [], []
    for ex, _ in samples:
        w, t, label = _vcr_rows(ex, tok, max_txt_len)
        words += w
        types += t
        labels.append(label)
    regions = [r[0] for _, r in samples for _ in range(NUM_CHOICES)]
    batch = _layout(words, [r.img_feat for r in regions], [r.img_pos for r in regions], tok,
                    [ex["id"] for ex, _ in samples], "vcr")
    txt_type_ids = np.zeros(batch["input_ids"].shape, dtype=np.int64)  # [4q, Lt]
    for i, t in enumerate(types):
        txt_type_ids[i, : len(t)] = t
    batch["txt_type_ids"] = torch.from_numpy(txt_type_ids)
    have = [label is not None for label in labels]
    if any(have) and not all(have):
        raise ValueError(f"vcr batch mixes labelled and unlabelled examples ({sum(have)} of {len(have)} labelled); "
                         "a task folder must be all labelled (train/val) or all unlabelled (test)")
    if all(have):
        targets = np.zeros((len(samples), NUM_CHOICES), dtype=np.int64)  # [q, 4]
        targets[np.arange(len(samples)), labels] = 1
        batch["targets"] = torch.from_numpy(targets.reshape(-1))  # [4q]
    batch["n_items"] = NUM_CHOICES * len(samples)
    return batch
