"""Downstream evaluation metrics (docs/downstream.md): VQA soft score, VE accuracy, image-text
retrieval recalls, referring-expression IoU accuracy, NLVR2 accuracy and consistency, VCR
Q->A / QA->R / Q->AR accuracy.

Pure numpy, so it runs on gathered host arrays after evaluation and in unit tests without a
GPU. Every function checks its inputs' shapes and raises ValueError saying what to pass.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

UNITER_TOPK = 10
"""UNITER's retrieval evaluation ranks only each row's / column's top 10 (docs/downstream.md)."""
_CHUNK_ELEMENTS = 1 << 22
"""Comparison elements per block when ranking, so a 25k x 5k score matrix needs no n^2 buffer."""


# ---------------------------------------------------------------------------- input checks


def _int_vector(x: Any, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of ints, got shape {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must hold ints (class indices), got dtype {a.dtype}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but there are {n} examples; pass one per example, "
                         f"in the examples' order")
    return a.astype(np.int64, copy=False)


def _nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"no {what} to score: the metric of an empty split is undefined")


def _float_matrix(x: Any, name: str, cols: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or (cols is not None and a.shape[1] != cols):
        want = f"[n, {cols}]" if cols is not None else "2-D"
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN: a NaN score cannot be ranked; check the model's outputs")
    return a


def _example_field(examples: Sequence[dict], i: int, key: str, task: str) -> Any:
    if key not in examples[i]:
        raise ValueError(f"{task} example {i} (id {examples[i].get('id')!r}) has no {key!r}: "
                         f"a test split has no gold labels, so write its predictions instead of scoring it")
    return examples[i][key]


# ---------------------------------------------------------------------------- VQA / VE


def vqa_score(pred_labels: np.ndarray, examples: Sequence[dict]) -> float:
    """Mean over examples of the soft score of the predicted answer: the example's `scores` entry
    for the predicted label in its `labels`, 0 for a label not listed (docs/downstream.md)."""
    pred = _int_vector(pred_labels, "pred_labels", len(examples))
    _nonempty(len(examples), "VQA examples")
    if not any("labels" in r for r in examples):
        raise ValueError("no VQA example has `labels`: a test split has no answers, so write its predictions "
                         "(trainer/predictions.py) instead of scoring it")
    total = 0.0
    for p, r in zip(pred.tolist(), examples):
        labels, scores = r.get("labels", []), r.get("scores", [])
        if len(labels) != len(scores):
            raise ValueError(f"VQA example {r.get('id')!r} has {len(labels)} labels but {len(scores)} scores")
        # An answer listed twice would be a builder bug; the largest score is the generous reading.
        total += max((float(s) for a, s in zip(labels, scores) if a == p), default=0.0)
    return total / len(examples)


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of predictions equal to the gold label (VE: the VQA score with one-hot targets)."""
    g = _int_vector(gold, "gold")
    p = _int_vector(pred, "pred", g.shape[0])
    _nonempty(g.shape[0], "examples")
    return float((p == g).mean())


# ---------------------------------------------------------------------------- retrieval


def _rows_per_block(width: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _image_ranks(scores: np.ndarray, txt_image: np.ndarray) -> np.ndarray:
    """[n_txt] position of each caption's GT image in its row sorted by descending score. Ties
    go to the lower image index (a stable descending sort), so the result is deterministic."""
    n_txt, n_img = scores.shape
    cols = np.arange(n_img)
    out = np.empty(n_txt, dtype=np.int64)
    step = _rows_per_block(n_img)
    for r0 in range(0, n_txt, step):
        block = scores[r0:r0 + step].astype(np.float64)
        gt = txt_image[r0:r0 + step]
        gt_score = block[np.arange(block.shape[0]), gt][:, None]
        ahead = (block > gt_score) | ((block == gt_score) & (cols[None, :] < gt[:, None]))
        out[r0:r0 + step] = ahead.sum(axis=1)
    return out


def _caption_ranks(scores: np.ndarray, txt_image: np.ndarray) -> np.ndarray:
    """[n_txt] position of each caption in its GT image's column sorted by descending score
    (ties to the lower caption index)."""
    n_txt = scores.shape[0]
    rows = np.arange(n_txt)
    out = np.empty(n_txt, dtype=np.int64)
    step = _rows_per_block(n_txt)
    for c0 in range(0, n_txt, step):
        caps = rows[c0:c0 + step]
        cols = scores[:, txt_image[caps]].astype(np.float64)  # [n_txt, block]: each caption's image column
        own = cols[caps, np.arange(caps.shape[0])][None, :]
        ahead = (cols > own) | ((cols == own) & (rows[:, None] < caps[None, :]))
        out[c0:c0 + step] = ahead.sum(axis=0)
    return out


def _best_caption_rank(caption_ranks: np.ndarray, txt_image: np.ndarray, n_img: int, absent: int) -> np.ndarray:
    """[n_img] the best (smallest) position among each image's captions; `absent` for none."""
    best = np.full(n_img, absent, dtype=np.int64)
    np.minimum.at(best, txt_image, caption_ranks)
    return best


def _check_retrieval(scores: Any, txt_image: Any, ks: Sequence[int], uniter_compat: bool):
    s = _float_matrix(scores, "scores [n_txt, n_img]")
    n_txt, n_img = s.shape
    _nonempty(n_txt * n_img, "retrieval scores")
    t = _int_vector(txt_image, "txt_image", n_txt)
    if t.size and (t.min() < 0 or t.max() >= n_img):
        raise ValueError(f"txt_image must index the score matrix's {n_img} image columns, "
                         f"got values in [{t.min()}, {t.max()}]")
    ks = tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    if uniter_compat and max(ks) > UNITER_TOPK:
        raise ValueError(f"uniter_compat reads only the top {UNITER_TOPK}, so every K must be <= {UNITER_TOPK}, "
                         f"got {ks!r}")
    return s, t, ks


def _summaries(txt: dict, img: dict) -> dict[str, float]:
    out = {**txt, **img}
    out["txt_r_mean"] = sum(txt.values()) / len(txt)
    out["img_r_mean"] = sum(img.values()) / len(img)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_recalls(scores: np.ndarray, txt_image: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      uniter_compat: bool = False) -> dict[str, float]:
    """Image-text retrieval recalls as fractions (docs/downstream.md).

    `scores` [n_txt, n_img] (higher = more alike); `txt_image` [n_txt] the column of each caption's
    image. Text retrieval (`txt_r{K}`): per image that has captions, hit when its best-placed
    caption sits at a position < K of the image's column ranking. Image retrieval (`img_r{K}`): per
    caption, hit when its image sits at a position < K of the caption's row ranking. Plus
    `txt_r_mean`, `img_r_mean` (means over ks) and `r_mean` (their mean).

    Positions come from a full descending sort, so the values are true recalls at any K.
    `uniter_compat=True` reproduces UNITER's published numbers instead, quirk included (see
    `_uniter_recalls`)."""
    s, t, ks = _check_retrieval(scores, txt_image, ks, uniter_compat)
    if uniter_compat:
        return _uniter_recalls(s, t, ks)
    n_img = s.shape[1]
    has_caption = np.bincount(t, minlength=n_img) > 0
    # An image without captions has nothing to retrieve: it is left out of the text-side
    # denominator (it still competes as a distractor on the image side).
    best = _best_caption_rank(_caption_ranks(s, t), t, n_img, absent=np.iinfo(np.int64).max)[has_caption]
    img_rank = _image_ranks(s, t)
    txt = {f"txt_r{k}": float((best < k).mean()) for k in ks}
    img = {f"img_r{k}": float((img_rank < k).mean()) for k in ks}
    return _summaries(txt, img)


def _uniter_recalls(s: np.ndarray, t: np.ndarray, ks: tuple) -> dict[str, float]:
    """UNITER's retrieval evaluation, reproduced (docs/downstream.md): only each row's and column's
    top 10 are read (a position past it counts as 10, a miss), and on the image side it
    thresholds BOTH columns of the (caption row, top-10 position) pairs where the GT image was
    found, so each found caption adds [position < K] + [caption index < K]. Image R@K therefore
    gains up to K spurious hits and can exceed 1 on a small set. Sets smaller than 10 are read
    through their top min(10, n) (UNITER's own top-10 call would fail on them)."""
    n_txt, n_img = s.shape
    img_rank = _image_ranks(s, t)
    found = np.flatnonzero(img_rank < min(UNITER_TOPK, n_img))  # caption rows whose GT image is in the top 10
    img = {f"img_r{k}": float(((img_rank[found] < k).sum() + (found < k).sum()) / n_txt) for k in ks}
    cap_rank = _caption_ranks(s, t)
    cap_rank = np.where(cap_rank < min(UNITER_TOPK, n_txt), cap_rank, UNITER_TOPK)
    # Every image counts in the denominator, as in UNITER (one without captions is a miss).
    best = _best_caption_rank(cap_rank, t, n_img, absent=UNITER_TOPK)
    txt = {f"txt_r{k}": float((best < k).sum() / n_img) for k in ks}
    return _summaries(txt, img)


# ---------------------------------------------------------------------------- referring expressions


def _box(b: Any, name: str) -> tuple[float, float, float, float]:
    a = np.asarray(b, dtype=np.float64)
    if a.shape != (4,) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be 4 finite numbers [x, y, w, h] in pixels, got {b!r}")
    return tuple(float(v) for v in a)


def iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] pixel boxes in the inclusive-pixel convention of the RE benchmark
    (docs/downstream.md): a box covers x .. x+w-1, so the overlap spans max(x) .. min(x+w-1) and
    measures (that span + 1) per axis, zero unless both extents are positive; the areas are w*h."""
    x1, y1, w1, h1 = _box(a, "box a")
    x2, y2, w2, h2 = _box(b, "box b")
    iw = min(x1 + w1 - 1, x2 + w2 - 1) - max(x1, x2) + 1
    ih = min(y1 + h1 - 1, y2 + h2 - 1) - max(y1, y2) + 1
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = w1 * h1 + w2 * h2 - inter
    if union <= 0:
        raise ValueError(f"boxes {a!r} and {b!r} have no area: IoU is undefined; check the boxes' w and h")
    return inter / union


def re_accuracy(pred_boxes: Sequence[Sequence[float]], gold_boxes: Sequence[Sequence[float]],
                threshold: float = 0.5, strict: bool = True) -> float:
    """Share of expressions whose predicted box overlaps the gold one: IoU > threshold when
    `strict` (UNITER), IoU >= threshold otherwise (ALBEF) (docs/downstream.md)."""
    if len(pred_boxes) != len(gold_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gold_boxes)} gold boxes; pass one per example")
    _nonempty(len(gold_boxes), "referring expressions")
    ious = np.array([iou_xywh(p, g) for p, g in zip(pred_boxes, gold_boxes)])
    hits = ious > threshold if strict else ious >= threshold
    return float(hits.mean())


# ---------------------------------------------------------------------------- NLVR2


def nlvr2_sentence_key(identifier: str) -> str:
    """The sentence an NLVR2 identifier (`split-set-pair-sentence`, e.g. `dev-850-0-0`) belongs
    to: the identifier with its third `-` field (the image pair) blanked, as the official
    evaluator groups them (docs/downstream.md)."""
    parts = str(identifier).split("-")
    if len(parts) < 3:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not `split-set-pair-sentence` (e.g. dev-850-0-0); "
                         f"consistency groups pairs of one sentence by these fields")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_metrics(pred: np.ndarray, examples: Sequence[dict]) -> dict[str, float]:
    """{"acc", "consistency"}: consistency = share of sentences all of whose image pairs are
    predicted right (docs/downstream.md)."""
    p = _int_vector(pred, "pred", len(examples))
    _nonempty(len(examples), "NLVR2 examples")
    gold = np.array([int(_example_field(examples, i, "label", "nlvr2")) for i in range(len(examples))])
    right = p == gold
    consistent: dict[str, bool] = {}
    for r, ok in zip(examples, right.tolist()):
        key = nlvr2_sentence_key(r["id"])
        consistent[key] = consistent.get(key, True) and ok
    return {"acc": float(right.mean()), "consistency": sum(consistent.values()) / len(consistent)}


# ---------------------------------------------------------------------------- VCR


def vcr_metrics(qa_scores: np.ndarray, qar_scores: np.ndarray, examples: Sequence[dict]) -> dict[str, float]:
    """{"qa_acc", "qar_acc", "q_ar_acc"} (docs/downstream.md). `qa_scores` [q, 4]: the four Q->A
    rows; `qar_scores` [q, 4]: the four QA->R rows conditioned on the GT answer. A question
    counts for Q->AR when both argmaxes are right."""
    n = len(examples)
    qa = _float_matrix(qa_scores, "qa_scores", 4)
    qar = _float_matrix(qar_scores, "qar_scores", 4)
    if qa.shape[0] != n or qar.shape[0] != n:
        raise ValueError(f"qa_scores has {qa.shape[0]} rows and qar_scores {qar.shape[0]} for {n} questions; "
                         f"pass one row per question (for test's 16 answer-major QA->R rows, take the GT answer's 4)")
    _nonempty(n, "VCR questions")
    a_gold = np.array([int(_example_field(examples, i, "answer_label", "vcr")) for i in range(n)])
    r_gold = np.array([int(_example_field(examples, i, "rationale_label", "vcr")) for i in range(n)])
    a_ok = qa.argmax(axis=1) == a_gold
    r_ok = qar.argmax(axis=1) == r_gold
    return {"qa_acc": float(a_ok.mean()), "qar_acc": float(r_ok.mean()), "q_ar_acc": float((a_ok & r_ok).mean())}
