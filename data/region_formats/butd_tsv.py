"""Bottom-up-attention TSV (`vlpt shards butd-tsv`): one row per image, tab-separated, as the
bottom-up-attention `generate_tsv.py` (and LXMERT's copies of it) write them:

    image_id  image_w  image_h  num_boxes  boxes  features  [cls_prob] [objects_conf] ...

`boxes` [n, 4] (x1, y1, x2, y2 in pixels of the image_w x image_h picture), `features` [n, D] and the
optional `cls_prob` [n, K] / `objects_conf` [n] are base64 of little-endian float32 arrays. Field
names come from `fields`: "butd" (the order above, no extra fields), "lxmert" (img_id, img_h, img_w,
objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features) or an explicit list; a
first line naming the fields (starting with image_id / img_id) overrides them for its file.

Planning reads every row once, keeping only each image's file and byte offset; building seeks to the
rows it needs. A row longer than MAX_RECORD_BYTES is skipped from its length, unread
("record_too_large"); one that does not parse is "bad_record"; an image id met again is
"duplicate_image_id" (the first row wins).
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

from data.builders import Entry, _check_common, _dedupe, check_box_args
from data.region_formats.record import (MAX_RECORD_BYTES, RecordError, RecordReader, RegionRecord, b64_float32,
                                        build_from_records, caption_entries, check_box_count, image_id_of,
                                        normalise_boxes)

FIELD_PRESETS = {
    "butd": ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
    "lxmert": ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
               "boxes", "features"),
}
ALIASES = {
    "image_id": ("image_id", "img_id"),
    "image_w": ("image_w", "img_w"),
    "image_h": ("image_h", "img_h"),
    "conf": ("objects_conf", "confidences", "conf"),
    "soft_labels": ("cls_prob",),
}
"""What each record part is called in the field lists seen in the wild."""
REQUIRED = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
MAX_LINE = MAX_RECORD_BYTES * 4 // 3 + 65536
"""Longest row read: base64 of a record at the byte budget, plus the small fields."""


def field_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name or a comma-separated / listed set of field names; ValueError naming what is missing."""
    if isinstance(spec, str):
        names = FIELD_PRESETS.get(spec) or tuple(n.strip() for n in spec.split(","))
    else:
        names = tuple(spec)
    missing = [part for part in REQUIRED if _name_of(names, part) is None]
    if missing or len(set(names)) != len(names):
        raise ValueError(f"TSV fields {list(names)} must name each of {', '.join(REQUIRED)} once (aliases: "
                         f"img_id, img_w, img_h); presets: {', '.join(FIELD_PRESETS)}")
    return names


def _name_of(names: Sequence[str], part: str) -> Optional[str]:
    return next((n for n in ALIASES.get(part, (part,)) if n in names), None)


def _parse(line: bytes, names: Sequence[str]) -> dict[str, str]:
    """One row as {field name: text}; RecordError when it does not split into `names`."""
    # csv's default limit (128 KiB) is below one row of features; MAX_LINE < 2**31 fits every platform's C long
    if csv.field_size_limit() < MAX_LINE:
        csv.field_size_limit(MAX_LINE)
    try:
        text = line.decode("utf-8").rstrip("\r\n")
        fields = next(csv.reader([text], delimiter="\t"))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        raise RecordError("bad_record", "a row that is not tab-separated UTF-8") from None
    if len(fields) != len(names):
        raise RecordError("bad_record", f"{len(fields)} fields, expected {len(names)}: {', '.join(names)}")
    return dict(zip(names, fields))


def _rows(path: Path, skipped: Counter) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each non-blank row; rows over MAX_LINE are counted and passed over unread."""
    with path.open("rb") as f:
        offset = 0
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                return
            start, offset = offset, offset + len(line)
            if len(line) == MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # the rest of the row, in bounded pieces
                    line = f.readline(MAX_LINE)
                    offset += len(line)
                skipped["record_too_large"] += 1
                continue
            if line.strip():
                yield start, line


def _header(line: bytes) -> Optional[tuple[str, ...]]:
    """The field names of a header row, else None."""
    first = line.split(b"\t", 1)[0].strip()
    if first not in (b"image_id", b"img_id"):
        return None
    try:
        return field_names(line.decode("utf-8").strip().split("\t"))
    except (UnicodeDecodeError, ValueError):
        return None


def index_tsv(paths: Sequence[Path], names: tuple[str, ...], skipped: Counter) -> tuple[dict, dict]:
    """({image id: (file, byte offset)}, {file: its field names}) over all rows of all files."""
    images: dict[str, tuple[str, str]] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    for path in paths:
        file_names = names
        for k, (offset, line) in enumerate(_rows(path, skipped)):
            header = _header(line) if k == 0 else None
            if header is not None:
                file_names = header
                continue
            try:
                image_id = image_id_of(_parse(line, file_names)[_name_of(file_names, "image_id")])
            except RecordError:
                image_id = None
            if image_id is None:
                skipped["bad_record"] += 1
            elif image_id in images:
                skipped["duplicate_image_id"] += 1
            else:
                images[image_id] = (str(path), str(offset))
        names_of[str(path)] = file_names
    return images, names_of


class TsvReader(RecordReader):
    """Reads the row of an entry (file, byte offset) into a RegionRecord."""

    def read(self, entry: Entry) -> RegionRecord:
        if entry.source not in self.handles:
            self.handles[entry.source] = open(entry.source, "rb")
        f = self.handles[entry.source]
        f.seek(int(entry.locator))
        line = f.readline(MAX_LINE)
        names = self.params["tsv_fields"][entry.source]
        return record_of(_parse(line, names), names)


def record_of(row: dict[str, str], names: Sequence[str]) -> RegionRecord:
    """A parsed row's regions: boxes normalised by the image size, conf and soft labels when present."""
    field = lambda part: row.get(_name_of(names, part) or "", "")  # noqa: E731  "" when absent
    try:
        n = check_box_count(int(field("num_boxes")))
    except ValueError:
        raise RecordError("bad_record", f"num_boxes {field('num_boxes')!r}") from None
    boxes = b64_float32(field("boxes"), n, 4, "boxes")  # [n, 4] pixels
    features = b64_float32(field("features"), n, -1, "features")  # [n, D]
    conf = b64_float32(field("conf"), n, None, "conf") if field("conf") else None  # [n]
    soft = b64_float32(field("soft_labels"), n, -1, "cls_prob") if field("soft_labels") else None  # [n, K]
    norm_bb = normalise_boxes(boxes, field("image_w"), field("image_h"))
    return RegionRecord(field("image_id"), features, norm_bb, conf, soft)


def build_butd_tsv_shards(tsv: str | Path | Sequence[str | Path], captions: str | Path, out: str | Path, *,
                          fields: str | Sequence[str] = "butd", conf_th: float = 0.2, min_bb: int = 10,
                          max_bb: int = 100, samples_per_shard: int = 1000, workers: int = 1,
                          progress: bool = False) -> dict:
    """Bottom-up-attention TSV file(s) + captions -> region shards in `out`; a summary dict (as
    data.builders' builders). img_dim, label_dim and the fields stored come from the first usable row."""
    out = Path(out)
    paths = [Path(os.path.abspath(p)) for p in ([tsv] if isinstance(tsv, (str, Path)) else tsv)]
    _check_common(out, samples_per_shard, workers)
    check_box_args(conf_th, min_bb, max_bb)
    names = field_names(fields)
    for p in paths:
        if not p.is_file():
            raise ValueError(f"TSV file not found: {p}")
    skipped: Counter = Counter()
    images, names_of = index_tsv(paths, names, skipped)
    entries = _dedupe(caption_entries(captions, images, skipped), skipped)
    reader_params = {"tsv_fields": {p: list(n) for p, n in names_of.items()}}
    meta = {"source": "butd-tsv", "tsv": [str(p) for p in paths], "captions": str(Path(captions).resolve())}
    return build_from_records("butd-tsv", out, entries, skipped, meta, TsvReader, ", ".join(map(str, paths)),
                              reader_params, conf_th=conf_th, min_bb=min_bb, max_bb=max_bb,
                              samples_per_shard=samples_per_shard, workers=workers, progress=progress)

