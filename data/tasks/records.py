"""Downstream examples: one JSON object per line of a task folder's `examples.jsonl`
(docs/downstream.md, "Task folders"). Each example names its image(s) by id; the region
features live once in region shards (data/shards.py) and are joined at load time.

Checking never raises on a bad line: `check_record` returns (record, None) or (None, reason),
and the reader counts reasons, as the shard decoder does (docs/data.md, "Bad and hostile input").
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

from data.shards import caption_reason

TASKS = ("vqa", "ve", "retrieval", "nlvr2", "re", "vcr")
MAX_LINE_BYTES = 1 << 20
"""Longest example line read (a VCR example is a few kB); longer ones are "line_too_long"."""
MAX_LABELS = 100
"""Most (label, score) pairs of one VQA example (10 annotators give at most 10 answers)."""
RECORD_SKIP_REASONS = ("bad_json", "line_too_long", "missing_field", "bad_field", "bad_caption", "empty_caption",
                       "bad_label", "unknown_image")
"""Why an example was skipped: "bad_json" (not one JSON object, or not UTF-8), "line_too_long",
"missing_field", "bad_field" (wrong type), "bad_caption"/"empty_caption" (text, as captions), "bad_label" (a label
outside the task's range), "unknown_image" (no region features under that image id)."""

VE_LABELS = ("contradiction", "entailment", "neutral")
"""UNITER's SNLI-VE label order (docs/downstream.md; ALBEF's differs)."""
NUM_CHOICES = 4
"""VCR answers and rationales per question."""


def _text_reason(value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return "bad_field"
    return caption_reason(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_vqa(r: dict, num_labels: int) -> Optional[str]:
    labels, scores = r.get("labels", []), r.get("scores", [])
    if not isinstance(labels, list) or not isinstance(scores, list) or len(labels) != len(scores):
        return "bad_field"
    if len(labels) > MAX_LABELS:
        return "bad_field"
    if not all(_is_int(a) and 0 <= a < num_labels for a in labels):
        return "bad_label"
    weights = r.get("weights", scores)  # ALBEF's answer weights (optional): the share of annotators
    if not isinstance(weights, list) or len(weights) != len(labels):
        return "bad_field"
    if not all(is_finite_number(s) and 0 <= s <= 1 for s in scores + weights):
        return "bad_label"
    return None


def _check_label(r: dict, field: str, n: int) -> Optional[str]:
    if field not in r:
        return "missing_field"
    return None if _is_int(r[field]) and 0 <= r[field] < n else "bad_label"


MAX_BOXES = 100
"""Most candidate boxes of one RE example (ALBEF grounding's detections; RefCOCO's detectors keep 100)."""


def is_finite_number(value: Any) -> bool:
    """An int or float that is finite as a float (JSON ints have no size limit: 1 followed by 400 zeros
    overflows math.isfinite)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)


def _check_re(r: dict) -> Optional[str]:
    for k in ("target", "box"):
        if k not in r:
            return "missing_field"
    if not _is_int(r["target"]) or r["target"] < 0:
        return "bad_label"
    if not _is_box(r["box"]):
        return "bad_field"
    for k in ("width", "height"):
        v = r.get(k, 1)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < 1e6):
            return "bad_field"
    boxes = r.get("boxes", [[0, 0, 1, 1]])  # optional: candidate boxes [x, y, w, h] (ALBEF grounding)
    if not isinstance(boxes, list) or not 0 < len(boxes) <= MAX_BOXES or not all(
            _is_box(b) and b[2] > 0 and b[3] > 0 for b in boxes):
        return "bad_field"
    return None


def _check_vcr(r: dict) -> Optional[str]:
    for k in ("question", "answers", "rationales"):
        if k not in r:
            return "missing_field"
    reason = _text_reason(r["question"])
    if reason:
        return reason
    for k in ("answers", "rationales"):
        choices = r[k]
        if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
            return "bad_field"
        for c in choices:
            reason = _text_reason(c)
            if reason:
                return reason
    for k in ("answer_label", "rationale_label"):
        if k in r and not (_is_int(r[k]) and 0 <= r[k] < NUM_CHOICES):
            return "bad_label"
    return None


def image_ids_of(r: dict) -> list[str]:
    """The images an example reads: its `image_ids` (NLVR2's pair) or its one `image_id`."""
    return list(r["image_ids"]) if "image_ids" in r else [r["image_id"]]


def _check_images(r: dict, task: str) -> Optional[str]:
    if task == "nlvr2":
        ids = r.get("image_ids")
        if ids is None:
            return "missing_field"
        return None if isinstance(ids, list) and len(ids) == 2 and all(_is_id(i) for i in ids) else "bad_field"
    if "image_id" not in r:
        return "missing_field"
    return None if _is_id(r["image_id"]) else "bad_field"


def check_record(r: Any, task: str, num_labels: int = 0) -> Optional[str]:
    """None if `r` is a usable example of `task`, else its skip reason. `num_labels`: the VQA answer
    vocabulary's size (other tasks have fixed label sets)."""
    if not isinstance(r, dict):
        return "bad_json"
    if "id" not in r:
        return "missing_field"
    if not _is_id(r["id"]):
        return "bad_field"
    reason = _check_images(r, task)
    if reason:
        return reason
    if task == "vcr":
        return _check_vcr(r)
    if "text" not in r:
        return "missing_field"
    reason = _text_reason(r["text"])
    if reason:
        return reason
    if task == "vqa":
        return _check_vqa(r, num_labels)
    if task == "ve":
        return _check_label(r, "label", len(VE_LABELS)) if "label" in r else None
    if task == "nlvr2":
        return _check_label(r, "label", 2) if "label" in r else None
    if task == "re":
        return _check_re(r)
    return None


def parse_line(line: bytes, task: str, num_labels: int = 0) -> tuple[Optional[dict], Optional[str]]:
    """(example, None) or (None, reason) for one line of examples.jsonl (bytes, newline optional)."""
    if len(line) > MAX_LINE_BYTES:
        return None, "line_too_long"
    try:
        r = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "bad_json"
    reason = check_record(r, task, num_labels)
    return (None, reason) if reason else (r, None)
