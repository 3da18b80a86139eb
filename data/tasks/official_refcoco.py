"""RefCOCO / RefCOCO+ / RefCOCOg -> `re` task folders: `vlpt tasks refcoco` (docs/downstream.md,
"Task folders"; the common rules are data/tasks/official.py's).

Inputs: the refs, either the original `refs(unc).p` / `refs(umd).p` pickle, read by
data/tasks/safe_pickle.py as plain data only (a pickle that asks for any class or function is
refused and nothing in it runs), or the commonly distributed JSON conversion (the same list of
{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", "sent_id"}]}); and the
dataset's COCO `instances.json` ({"images": [{"id", "width", "height"}], "annotations":
[{"id", "image_id", "bbox": [x, y, w, h]}]}).

One example per sentence: {id: sent_id, image_id, text: sent, target, box, width, height}, where
`target` is the index of the ref's `ann_id` among its image's annotations in the order of
instances.json: the ground-truth boxes in the order the region features of an image are stored
(docs/downstream.md, table: `re`). The folder is the ref's `split` (train, val, test, testA,
testB, testC).

Extra skip reasons: "bad_annotation" (an instances annotation without a usable id / image_id,
or a repeated id: it cannot be placed in its image's order), "bad_image_entry" (an instances
image without a usable id, width or height), "unknown_annotation" (a ref's ann_id not in
instances.json), "unknown_image" (its image not there), "image_mismatch" (the ref's image_id is
not its annotation's). A problem of a whole ref counts once; one of a sentence, once per sentence.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

from data.tasks.official import (DEFAULT_MAX_JSON_BYTES, TaskBuild, _regular_file, add_sentences, as_id,
                                 check_id_format, format_image_id, read_json)
from data.tasks.records import is_finite_number
from data.tasks.safe_pickle import load_restricted

REFCOCO_SPLITS = ("train", "val", "test", "testA", "testB", "testC")
MAX_SENTENCES_PER_REF = 100
"""Most sentences one ref may carry (the releases have a handful). A pickle may share one list
among many refs; the cap keeps the work linear in the file's size."""
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def load_refs(path: str | Path, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> list:
    """The refs list of a refs pickle (by suffix, or any file not starting like JSON) or JSON file."""
    path = _regular_file(path, "refs file")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.suffix.lower() in PICKLE_SUFFIXES or (path.suffix.lower() != ".json" and head[:1] not in (b"[", b"{")):
        refs = load_restricted(path, "refs pickle", max_bytes)
    else:
        refs = read_json(path, "refs file", max_bytes)
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} holds a {type(refs).__name__}, expected a list of refs "
                         "({ref_id, ann_id, image_id, split, sentences})")
    return refs


def _size(img: dict) -> Optional[tuple[float, float]]:
    w, h = img.get("width"), img.get("height")
    for v in (w, h):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
            return None
    return w, h


def read_instances(path: str | Path, skipped: Counter, max_bytes: int = DEFAULT_MAX_JSON_BYTES
                   ) -> tuple[dict[str, tuple], dict[str, tuple[str, int, Any]]]:
    """({image id: (width, height)}, {annotation id: (image id, index in its image, bbox)}) of a
    COCO instances file; bad entries are counted in `skipped`."""
    data = read_json(path, "instances file", max_bytes)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"instances file {path} is not COCO instances JSON ({{'images': [...], "
                         "'annotations': [...]}})")
    sizes: dict[str, tuple] = {}
    for img in data["images"]:
        key = as_id(img.get("id")) if isinstance(img, dict) else None
        size = _size(img) if key is not None else None
        if size is None or key in sizes:
            skipped["bad_image_entry"] += 1
            continue
        sizes[key] = size
    anns: dict[str, tuple[str, int, Any]] = {}
    per_image: Counter = Counter()
    for ann in data["annotations"]:
        key = as_id(ann.get("id")) if isinstance(ann, dict) else None
        image = as_id(ann.get("image_id")) if key is not None else None
        if image is None or key in anns:
            skipped["bad_annotation"] += 1
            continue
        anns[key] = (image, per_image[image], ann.get("bbox"))
        per_image[image] += 1
    return sizes, anns


def _box(bbox: Any) -> Optional[list[float]]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_finite_number(v) for v in bbox):
        return None
    return [float(v) for v in bbox]


def _ref_target(ref: Any, sizes: dict, anns: dict, fmt: str) -> tuple[Optional[dict], Optional[str]]:
    """(the fields every sentence of `ref` shares, None), or (None, reason)."""
    if not isinstance(ref, dict):
        return None, "bad_record"
    for key in ("ann_id", "image_id", "split", "sentences"):
        if ref.get(key) is None:
            return None, "missing_field"
    if ref["split"] not in REFCOCO_SPLITS:
        return None, "bad_split"
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or len(sentences) > MAX_SENTENCES_PER_REF:
        return None, "bad_field"
    ann = anns.get(as_id(ref["ann_id"]))
    if ann is None:
        return None, "unknown_annotation"
    image, target, bbox = ann
    if as_id(ref["image_id"]) != image:
        return None, "image_mismatch"
    if image not in sizes:
        return None, "unknown_image"
    box, image_id = _box(bbox), format_image_id(fmt, ref["image_id"])
    if box is None or image_id is None:
        return None, "bad_field"
    w, h = sizes[image]
    return {"image_id": image_id, "target": target, "box": box, "width": w, "height": h}, None


def read_detections(path: str | Path, skipped: Counter, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> dict:
    """ALBEF's detections file ({image id: [[x, y, w, h, ...], ...]}) -> {image id: candidate boxes}: each
    detection's first four numbers, w and h > 0, at most MAX_BOXES per image; bad ones counted, not kept."""
    from data.tasks.records import MAX_BOXES

    data = read_json(path, "--detections file", max_bytes)
    if not isinstance(data, dict):
        raise ValueError(f"--detections {path}: expected a JSON object {{image id: [[x, y, w, h], ...]}}")
    out = {}
    for image, dets in data.items():
        dets = dets if isinstance(dets, list) else [dets]
        boxes = [b for b in (_box(d[:4]) if isinstance(d, list) else None for d in dets)
                 if b is not None and b[2] > 0 and b[3] > 0]
        if len(boxes) < len(dets):
            skipped["bad_detection"] += len(dets) - len(boxes)
        if boxes and as_id(image) is not None:
            out[as_id(image)] = boxes[:MAX_BOXES]
    return out


def build_refcoco(refs: str | Path, instances: str | Path, out: str | Path, *,
                  splits: Optional[Iterable[str]] = None, image_id_format: str = "{}",
                  detections: Optional[str | Path] = None, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> dict:
    """RefCOCO/+/g refs (pickle or JSON) + COCO instances -> `re` task folders `<out>/<split>`
    (module docstring); `splits`: write only these (default: every split the refs have); `detections`: ALBEF's
    detections file, whose boxes become each example's candidate `boxes` (ALBEF grounding)."""
    check_id_format(image_id_format)
    wanted = set(splits) if splits else None
    unknown = sorted((wanted or set()) - set(REFCOCO_SPLITS))
    if unknown:
        raise ValueError(f"--splits {', '.join(unknown)}: RefCOCO splits are {', '.join(REFCOCO_SPLITS)}")
    build = TaskBuild("re")
    sizes, anns = read_instances(instances, build.skipped, max_json_bytes)
    dets = read_detections(detections, build.skipped, max_json_bytes) if detections else None
    for ref in load_refs(refs, max_json_bytes):
        shared, reason = _ref_target(ref, sizes, anns, image_id_format)
        if reason:
            build.skip(reason)
            continue
        if wanted is not None and ref["split"] not in wanted:
            continue
        if dets is not None and as_id(ref["image_id"]) in dets:
            shared = {**shared, "boxes": dets[as_id(ref["image_id"])]}
        add_sentences(build, ref["split"], ref["sentences"], ("sent_id", "sent"), shared)
    return build.write(out, meta={"source": "RefCOCO", "refs": str(refs), "instances": str(instances),
                                  "image_id_format": image_id_format, "boxes": "ground truth, instances order",
                                  "detections": str(detections) if detections else None})
