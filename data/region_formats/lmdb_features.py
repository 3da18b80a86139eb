"""Detectron2-style region features in an LMDB (`vlpt shards lmdb-features`).

The LMDB folder (holding data.mdb) maps an image id (UTF-8 key; keys starting with `__`, such as
`__keys__`, are metadata and ignored) to one record: a msgpack map (arrays as msgpack_numpy's dicts or
nested lists of numbers), the same in an lz4 frame, or np.savez bytes. Never pickle. Fields:

| field | required | what |
| --- | --- | --- |
| `features` | yes | [n, D] region features |
| `boxes` | yes | [n, 4] x1, y1, x2, y2 in pixels of the *resized* frame the detector saw |
| `resized_width`, `resized_height` | one of the two ways | size of that frame |
| `image_width`, `image_height` + `scale` | to give it | original size and resize factor (frame = original x scale) |
| `num_boxes` | no | n, checked against the arrays |
| `cls_prob` | no | [n, K] class distribution -> soft labels |
| `scores` (or `conf`) | no | [n] detector confidence -> conf (box selection) |

Boxes are normalised by the frame they are in, which is the same as scaling them back to the original
image and normalising by its size. A record lacking a required field is skipped as "missing_field";
when no record is usable the build stops with one line naming the first record's missing field.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from data.builders import _check_common, _dedupe, check_box_args
from data.region_formats.record import (LmdbRecordReader, RecordError, RegionRecord, array_field, as_number,
                                        build_from_records, caption_entries, check_box_count, image_id_of,
                                        lmdb_errors, lmdb_folder, normalise_boxes, open_lmdb)

RECORD_FIELDS = ("features", "boxes", "cls_prob", "scores", "conf", "num_boxes", "image_width", "image_height",
                 "resized_width", "resized_height", "scale")


def index_lmdb(folder: Path, skipped: Counter) -> dict[str, tuple[str, str]]:
    """{image id: (data.mdb, key)} of every record key (metadata keys `__*` left out)."""
    images: dict[str, tuple[str, str]] = {}
    source = str(folder / "data.mdb")
    with lmdb_errors(folder), open_lmdb(folder) as env, env.begin() as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            try:
                image_id = image_id_of(key.decode("utf-8"))
            except UnicodeDecodeError:
                image_id = None
            if image_id is None:
                skipped["bad_record"] += 1
            elif not image_id.startswith("__"):
                images[image_id] = (source, image_id)
    return images


def frame_size(record: dict[str, Any]) -> tuple[float, float]:
    """(width, height) of the frame the boxes are in: resized_width/height, else image_width/height x scale."""
    if record.get("resized_width") is not None and record.get("resized_height") is not None:
        return (as_number(record["resized_width"], "resized_width"),
                as_number(record["resized_height"], "resized_height"))
    missing = [k for k in ("image_width", "image_height", "scale") if record.get(k) is None]
    if missing:
        raise RecordError("missing_field", f"no resized_width/resized_height, nor {' / '.join(missing)} "
                                           f"to derive them (boxes are in the resized frame)")
    scale = as_number(record["scale"], "scale")
    return as_number(record["image_width"], "image_width") * scale, \
        as_number(record["image_height"], "image_height") * scale


def record_of(image_id: str, record: dict[str, Any]) -> RegionRecord:
    features = array_field(record, "features", 2)  # [n, D]
    n = check_box_count(len(features))
    if record.get("num_boxes") is not None and as_number(record["num_boxes"], "num_boxes") != n:
        raise RecordError("bad_shape", f"num_boxes {record['num_boxes']!r} for {n} feature rows")
    boxes = array_field(record, "boxes", 2, n)  # [n, 4] resized-frame pixels
    width, height = frame_size(record)
    conf_name = "scores" if record.get("scores") is not None else "conf"
    conf = array_field(record, conf_name, 1, n) if record.get(conf_name) is not None else None
    soft = array_field(record, "cls_prob", 2, n) if record.get("cls_prob") is not None else None
    return RegionRecord(image_id, features, normalise_boxes(boxes, width, height), conf, soft)


class LmdbFeatureReader(LmdbRecordReader):
    """Reads the record of an entry (entry.locator: its key) into a RegionRecord."""

    fields = RECORD_FIELDS

    def to_record(self, key: str, dump: dict[str, Any]) -> RegionRecord:
        return record_of(key, dump)


def build_lmdb_feature_shards(lmdb: str | Path, captions: str | Path, out: str | Path, *, conf_th: float = 0.2,
                              min_bb: int = 10, max_bb: int = 100, samples_per_shard: int = 1000, workers: int = 1,
                              progress: bool = False) -> dict:
    """Detectron2-style feature LMDB + captions -> region shards in `out`; a summary dict."""
    out = Path(out)
    _check_common(out, samples_per_shard, workers)
    check_box_args(conf_th, min_bb, max_bb)
    folder = lmdb_folder(lmdb, "feature LMDB")
    skipped: Counter = Counter()
    entries = _dedupe(caption_entries(captions, index_lmdb(folder, skipped), skipped), skipped)
    meta = {"source": "lmdb-features", "lmdb": str(folder), "captions": str(Path(captions).resolve())}
    return build_from_records("lmdb-features", out, entries, skipped, meta, LmdbFeatureReader, f"feature LMDB {folder}",
                              conf_th=conf_th, min_bb=min_bb, max_bb=max_bb, samples_per_shard=samples_per_shard,
                              workers=workers, progress=progress)

