"""VCR -> `vcr` task folders: `vlpt tasks vcr` (docs/downstream.md, "Task folders"; the common
rules are data/tasks/official.py's).

Input: the official JSONL files (train.jsonl, val.jsonl, test.jsonl), one question a line:
{"annot_id", "img_id" (or only "img_fn"), "objects": ["person", "car", ...], "question": [tokens],
"answer_choices": [[tokens] x 4], "rationale_choices": [[tokens] x 4], "answer_label",
"rationale_label"} (labels absent on test). A token is a word or a list of object indices.

Output: {id: annot_id, image_id, question, answers [4], rationales [4], answer_label,
rationale_label} with every choice as one string. Object references become text: index i
becomes the object's name followed by i + 1 (VCR numbers its tags from 1), a list is joined
with commas and "and": with objects ["person", "person", "car"], the token [0, 1] reads
"person1 and person2" and [2] reads "car3". UNITER instead maps a reference to an extra word
id, which the model's 81 extra word-embedding rows serve (docs/downstream.md); the text form
keeps the folder tokenizer-independent. Tokens are joined by single spaces, as written.

`image_id` is `img_id`; a line with only `img_fn` uses the file name without its extension
("lsmdc_x/clip@0.jpg" -> "lsmdc_x/clip@0"): an id, never opened as a path.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Optional

from data.tasks.official import as_id, build_jsonl, need_id
from data.tasks.records import NUM_CHOICES

MAX_OBJECTS = 1000
"""Most detected objects of one image (VCR images have at most a few dozen)."""


def _object_ref(indices: list, objects: list[str]) -> Optional[str]:
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(objects)
                              for i in indices):
        return None
    names = [f"{objects[i]}{i + 1}" for i in indices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def vcr_text(tokens: Any, objects: list[str]) -> Optional[str]:
    """The tokens as one string, object references named (module docstring); None if malformed."""
    if not isinstance(tokens, list) or not tokens:
        return None
    words = []
    for token in tokens:
        word = token if isinstance(token, str) else _object_ref(token, objects) if isinstance(token, list) else None
        if word is None:
            return None
        words.append(word)
    return " ".join(words)


def _image_id(r: dict) -> tuple[Optional[str], Optional[str]]:
    if r.get("img_id") is not None:
        return need_id(r, "img_id")
    if not isinstance(r.get("img_fn"), str) or not r["img_fn"].strip():
        return None, "missing_field" if r.get("img_fn") is None else "bad_field"
    path = PurePosixPath(r["img_fn"])
    value = as_id(str(path.with_suffix("")) if path.suffix else str(path))
    return (value, None) if value else (None, "bad_field")


def _choices(r: dict, key: str, objects: list[str]) -> tuple[Optional[list[str]], Optional[str]]:
    choices = r.get(key)
    if choices is None:
        return None, "missing_field"
    if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
        return None, "bad_field"
    texts = [vcr_text(c, objects) for c in choices]
    return (None, "bad_field") if any(t is None for t in texts) else (texts, None)


def _labels(r: dict) -> tuple[dict, Optional[str]]:
    out = {}
    for key in ("answer_label", "rationale_label"):
        value = r.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NUM_CHOICES:
            return {}, "bad_label"
        out[key] = value
    return out, None


def vcr_example(r: dict) -> tuple[Optional[dict], Optional[str]]:
    """(example, None) of one VCR line, or (None, skip reason)."""
    annot_id, reason = need_id(r, "annot_id")
    image_id, image_reason = _image_id(r)
    if reason or image_reason:
        return None, reason or image_reason
    objects = r.get("objects")
    if objects is None or r.get("question") is None:
        return None, "missing_field"
    if not isinstance(objects, list) or len(objects) > MAX_OBJECTS or not all(
            isinstance(o, str) and o for o in objects):
        return None, "bad_field"
    question = vcr_text(r["question"], objects)
    answers, reason = _choices(r, "answer_choices", objects)
    rationales, choice_reason = _choices(r, "rationale_choices", objects)
    labels, label_reason = _labels(r)
    reason = ("bad_field" if question is None else None) or reason or choice_reason or label_reason
    if reason:
        return None, reason
    return {"id": annot_id, "image_id": image_id, "question": question, "answers": answers,
            "rationales": rationales, **labels}, None


def build_vcr(jsonl: dict[str, str], out: str | Path) -> dict:
    """VCR JSONL files, {split: path} -> `<out>/<split>` task folders (module docstring)."""
    return build_jsonl("vcr", "VCR", jsonl, out, vcr_example, {"object_references": "name + (index + 1), e.g. person1"})
