"""Predictions files of the downstream tasks, in the formats their official evaluators and
leaderboards read (docs/downstream.md): `vlpt evaluate` writes one per task into its output
folder, and `read_predictions` reads them back (tests, reports).

| task | files | format |
|---|---|---|
| vqa | predictions.json | JSON list [{"question_id", "answer"}] (VQA eval / EvalAI); all-digit ids as ints |
| ve | predictions.csv | CSV with header `pair_id,label`, label names contradiction/entailment/neutral |
| nlvr2 | predictions.csv | `identifier,True|False` lines, no header (the NLVR2 evaluate script reads every line) |
| re | predictions.json | JSON list [{"id", "box": [x, y, w, h], "iou"}] (iou null without a gold box) |
| vcr | predictions.csv | leaderboard CSV: `annot_id`, `answer_0..3`, `rationale_conditioned_on_a{i}_{j}`, i, j 0..3 |
| retrieval | scores.npy, ids.json, recalls.json | float16 [n_txt, n_img]; {"texts", "images"}; the recalls |
| (ALBEF) | + scores_i2t.npy | [n_img, n_txt]: each image's own top-k texts re-scored; both float32 |

Every file is written to a temporary file in the same folder and renamed over its name, so a
reader never sees half a file, and only under the given folder.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from data.atomic_write import write_atomic
from data.tasks.records import NUM_CHOICES, VE_LABELS
from trainer.downstream_metrics import iou_xywh

FILES = {
    "vqa": ("predictions.json",),
    "ve": ("predictions.csv",),
    "nlvr2": ("predictions.csv",),
    "re": ("predictions.json",),
    "vcr": ("predictions.csv",),
    "retrieval": ("scores.npy", "ids.json", "recalls.json"),
}
"""The files each task's predictions are written to, inside the output folder."""
I2T_FILE = "scores_i2t.npy"
"""Retrieval, when the image->text scores are a matrix of their own (ALBEF)."""
VCR_COLUMNS = (["annot_id"] + [f"answer_{i}" for i in range(NUM_CHOICES)]
               + [f"rationale_conditioned_on_a{a}_{r}" for a in range(NUM_CHOICES) for r in range(NUM_CHOICES)])
"""The VCR leaderboard's columns: answer probabilities, then rationale probabilities given each answer."""
_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------- writing


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def _check_ids(ids: Sequence[Any], n: int, what: str, no_comma: bool = False) -> list[str]:
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"{len(out)} ids for {n} {what}; pass one id per prediction, in the same order")
    for i in out:
        if not i or "\n" in i or "\r" in i or (no_comma and "," in i):
            bad = "a comma, which the official evaluator splits on" if "," in i else "an empty id or a line break"
            raise ValueError(f"id {i!r} holds {bad}; ids must be the examples' `id` fields")
    return out


def write_vqa_predictions(path: str, ids: Sequence[Any], answers: Sequence[str]) -> str:
    """VQA results file: [{"question_id", "answer"}], the question id as an int when all digits
    (the VQA evaluation and EvalAI match ints)."""
    sids = _check_ids(ids, len(answers), "answers")
    if not all(isinstance(a, str) for a in answers):
        raise ValueError("answers must be strings (the answer vocabulary's entries), not label indices")
    rows = [{"question_id": int(i) if _DIGITS.fullmatch(i) else i, "answer": a} for i, a in zip(sids, answers)]
    return write_atomic(path, json.dumps(rows))


def _ve_name(label: Any) -> str:
    if isinstance(label, str) and label in VE_LABELS:
        return label
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(VE_LABELS):
        return VE_LABELS[int(label)]
    raise ValueError(f"VE label {label!r} is neither an index 0..{len(VE_LABELS) - 1} nor one of {VE_LABELS}")


def write_ve_predictions(path: str, ids: Sequence[Any], labels: Sequence[Any]) -> str:
    """SNLI-VE predictions: CSV `pair_id,label` with a header, labels by name (UNITER's order)."""
    sids = _check_ids(ids, len(labels), "labels")
    return write_atomic(path, _csv_text([("pair_id", "label")] + [(i, _ve_name(x)) for i, x in zip(sids, labels)]))


def _bool_label(label: Any) -> str:
    if isinstance(label, (bool, np.bool_)) or (isinstance(label, (int, np.integer)) and label in (0, 1)):
        return "True" if bool(label) else "False"
    raise ValueError(f"NLVR2 prediction {label!r} must be 1/True or 0/False")


def write_nlvr2_predictions(path: str, ids: Sequence[Any], labels: Sequence[Any]) -> str:
    """NLVR2 predictions: `identifier,True|False` lines, no header (the official script takes
    every line's first two comma fields)."""
    sids = _check_ids(ids, len(labels), "predictions", no_comma=True)
    return write_atomic(path, "".join(f"{i},{_bool_label(x)}\n" for i, x in zip(sids, labels)))


def _finite_floats(values: Sequence[Any], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} holds a non-finite number: {list(values)!r}")
    return out


def write_re_predictions(path: str, ids: Sequence[Any], boxes: Sequence[Sequence[float]],
                         ious: Optional[Sequence[Optional[float]]] = None) -> str:
    """RE predictions: [{"id", "box": [x, y, w, h] pixels, "iou"}]; `iou` null where no gold box."""
    sids = _check_ids(ids, len(boxes), "boxes")
    ious = [None] * len(boxes) if ious is None else list(ious)
    if len(ious) != len(boxes):
        raise ValueError(f"{len(ious)} IoUs for {len(boxes)} boxes; pass one per box, or None")
    rows = []
    for i, b, v in zip(sids, boxes, ious):
        if len(b) != 4:
            raise ValueError(f"box of {i!r} must be [x, y, w, h], got {b!r}")
        rows.append({"id": i, "box": _finite_floats(b, f"box of {i!r}"),
                     "iou": None if v is None else _finite_floats([v], f"iou of {i!r}")[0]})
    return write_atomic(path, json.dumps(rows))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def write_vcr_predictions(path: str, ids: Sequence[Any], answer_scores: Any, rationale_scores: Any) -> str:
    """VCR leaderboard CSV. `answer_scores` [q, 4]: Q->A logits; `rationale_scores` [q, 4, 4] or
    [q, 16] answer-major: QA->R logits given each answer. Each group of four is written as
    softmax probabilities (the leaderboard takes argmaxes, which the softmax keeps)."""
    a = np.asarray(answer_scores, dtype=np.float64)
    r = np.asarray(rationale_scores, dtype=np.float64)
    q = a.shape[0] if a.ndim else 0
    if a.shape != (q, NUM_CHOICES) or r.reshape(-1).shape[0] != q * NUM_CHOICES ** 2 or r.shape[0:1] != (q,):
        raise ValueError(f"answer_scores must be [q, 4] and rationale_scores [q, 4, 4] (or [q, 16] answer-major: "
                         f"the leaderboard needs QA->R given each of the 4 answers; [q, 4] given only the gold "
                         f"answer is not enough), got {a.shape} and {r.shape}")
    if not (np.isfinite(a).all() and np.isfinite(r).all()):
        raise ValueError("VCR scores hold a non-finite number; check the model's outputs")
    sids = _check_ids(ids, q, "questions")
    probs = np.concatenate([_softmax(a), _softmax(r.reshape(q, NUM_CHOICES, NUM_CHOICES)).reshape(q, -1)], axis=1)
    rows = [VCR_COLUMNS] + [[i] + [repr(float(v)) for v in p] for i, p in zip(sids, probs)]
    return write_atomic(path, _csv_text(rows))


def write_retrieval_outputs(out_dir: str, scores: Any, text_ids: Sequence[Any], image_ids: Sequence[Any],
                            recalls: dict, scores_i2t: Any = None, dtype: str = "float16") -> list[str]:
    """scores.npy ([n_txt, n_img], float16 as UNITER's full evaluation), ids.json {"texts", "images"} (the
    matrix's row and column ids, in order), recalls.json (the recall dict); with `scores_i2t` (ALBEF: each
    image re-ranks its own top-k texts, so the image->text scores are a matrix of their own) also
    scores_i2t.npy ([n_img, n_txt]). ALBEF's matrices are float32 (`dtype`), as its evaluation."""
    s = _score_matrix(scores, (len(text_ids), len(image_ids)), "scores", "[n_txt, n_img]", dtype)
    texts = _check_ids(text_ids, s.shape[0], "score rows")
    images = _check_ids(image_ids, s.shape[1], "score columns")
    rec = {str(k): float(v) for k, v in recalls.items()}
    names = FILES["retrieval"]
    paths = [write_atomic(os.path.join(out_dir, names[0]), lambda f: np.save(f, s, allow_pickle=False)),
             write_atomic(os.path.join(out_dir, names[1]), json.dumps({"texts": texts, "images": images})),
             write_atomic(os.path.join(out_dir, names[2]), json.dumps(rec, indent=1, sort_keys=True))]
    if scores_i2t is not None:
        s_i2t = _score_matrix(scores_i2t, (len(image_ids), len(text_ids)), "scores_i2t", "[n_img, n_txt]", dtype)
        paths.append(write_atomic(os.path.join(out_dir, I2T_FILE), lambda f: np.save(f, s_i2t, allow_pickle=False)))
    return paths


def _score_matrix(scores: Any, shape: tuple[int, int], name: str, named_shape: str, dtype: str) -> np.ndarray:
    if dtype not in ("float16", "float32"):
        raise ValueError(f"retrieval scores are written as float16 or float32, not {dtype!r}")
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape != shape:
        raise ValueError(f"{name} must be {named_shape} = {list(shape)}, got {s.shape}")
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the check below reports
        cast = s.astype(dtype)
    if not np.isfinite(cast).all():
        raise ValueError(f"{name} hold a NaN/inf or a value beyond {dtype}'s range; check the model outputs")
    return cast


_NEEDED = {
    "vqa": ("ids", "answers"),
    "ve": ("ids", "labels"),
    "nlvr2": ("ids", "labels"),
    "re": ("ids", "boxes"),
    "vcr": ("ids", "answer_scores", "rationale_scores"),
    "retrieval": ("scores", "text_ids", "image_ids", "recalls"),
}
"""The payload keys each task's writer needs, in its arguments' order."""
def _payload_args(task: str, payload: dict) -> list[Any]:
    missing = [key for key in _NEEDED[task] if key not in payload]
    if missing:
        raise ValueError(f"{task} predictions payload lacks {missing}; it needs {list(_NEEDED[task])}")
    return [payload[key] for key in _NEEDED[task]]


def _re_ious(payload: dict) -> Optional[list]:
    """The payload's `ious`, else the IoU of each box with its `gold` box, else None."""
    if "ious" in payload or "gold" not in payload:
        return payload.get("ious")
    boxes, gold = payload["boxes"], payload["gold"]
    if len(gold) != len(boxes):
        raise ValueError(f"{len(gold)} gold boxes for {len(boxes)} predicted boxes; pass one per example")
    return [iou_xywh(b, g) for b, g in zip(boxes, gold)]


def write_predictions(task: str, out_dir: str, payload: dict) -> list[str]:
    """Write `task`'s predictions files (FILES[task]) into `out_dir`; returns their paths.

    payload keys: vqa ids, answers; ve ids, labels (index or name); nlvr2 ids, labels (0/1);
    re ids, boxes, and ious or gold (gold boxes, to compute them) or neither; vcr ids,
    answer_scores [q, 4], rationale_scores [q, 4, 4]; retrieval scores, text_ids, image_ids,
    recalls."""
    if task not in FILES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(FILES)}")
    args = _payload_args(task, payload)
    if task == "retrieval":
        return write_retrieval_outputs(out_dir, *args, scores_i2t=payload.get("scores_i2t"),
                                       dtype=payload.get("scores_dtype", "float16"))
    path = os.path.join(out_dir, FILES[task][0])
    if task == "re":
        return [write_re_predictions(path, *args, ious=_re_ious(payload))]
    write = {"vqa": write_vqa_predictions, "ve": write_ve_predictions, "nlvr2": write_nlvr2_predictions,
             "vcr": write_vcr_predictions}[task]
    return [write(path, *args)]


# ---------------------------------------------------------------------------- reading


def _read_csv(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.reader(f) if row]


def _read_vcr(path: str) -> dict:
    rows = _read_csv(path)
    if not rows or rows[0] != VCR_COLUMNS:
        raise ValueError(f"{path}: header is not the VCR leaderboard's columns {VCR_COLUMNS}")
    probs = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64).reshape(-1, 20)
    return {"ids": [r[0] for r in rows[1:]], "answer_probs": probs[:, :NUM_CHOICES],
            "rationale_probs": probs[:, NUM_CHOICES:].reshape(-1, NUM_CHOICES, NUM_CHOICES)}


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_predictions(task: str, out_dir: str) -> dict:
    """Read back what `write_predictions(task, out_dir, ...)` wrote, in the payload's shape
    (VE labels as names, NLVR2 labels as bools, VCR as probabilities `answer_probs` [q, 4] and
    `rationale_probs` [q, 4, 4])."""
    if task not in FILES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(FILES)}")
    path = os.path.join(out_dir, FILES[task][0])
    if task == "vqa":
        rows = _read_json(path)
        return {"ids": [str(r["question_id"]) for r in rows], "answers": [r["answer"] for r in rows]}
    if task == "re":
        rows = _read_json(path)
        return {"ids": [r["id"] for r in rows], "boxes": [r["box"] for r in rows], "ious": [r["iou"] for r in rows]}
    if task == "ve":
        rows = _read_csv(path)[1:]
        return {"ids": [r[0] for r in rows], "labels": [r[1] for r in rows]}
    if task == "nlvr2":
        rows = _read_csv(path)
        return {"ids": [r[0] for r in rows], "labels": [r[1] == "True" for r in rows]}
    if task == "vcr":
        return _read_vcr(path)
    ids = _read_json(os.path.join(out_dir, FILES[task][1]))
    out = {"scores": _read_matrix(path), "text_ids": ids["texts"], "image_ids": ids["images"],
           "recalls": _read_json(os.path.join(out_dir, FILES[task][2]))}
    if os.path.isfile(os.path.join(out_dir, I2T_FILE)):
        out["scores_i2t"] = _read_matrix(os.path.join(out_dir, I2T_FILE))
    return out


def _read_matrix(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.load(f, allow_pickle=False)
