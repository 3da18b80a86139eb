"""UNITER's own databases (`vlpt shards uniter-lmdb`), as UNITER's scripts/convert_imgdir.py and
prepro.py write them and its data/data.py (`DetectFeatLmdb`, `TxtLmdb`) reads them:

- img_db: a folder holding one LMDB (`feat_th0.2_max100_min10[_compressed]/`, `all[_compressed]/`, ...;
  or the LMDB folder itself, the one with data.mdb). Keys: image file names (`coco_train2014_...npz`),
  plus `__keys__` (a JSON list of them, ignored). Values: one image's arrays `features` [n, D] (fp16),
  `norm_bb` [n, 6] (x1, y1, x2, y2, w, h normalised; a 7th column, w*h, is dropped), `conf` [n],
  `soft_labels` [n, K]: np.savez_compressed bytes (the `_compressed` databases) or msgpack with
  msgpack_numpy's array dicts; an lz4 frame around the msgpack is accepted too. Read without pickle.
  `nbb_th*.json` is not needed: boxes are selected from `conf` by the same rule (`--conf-th` ...).
- txt_db: an LMDB folder of examples keyed by text id, each an lz4 frame of msgpack (`TxtLmdb`):
  {"img_fname": str, "input_ids": [...], and the text: "raw" (pretraining), "sentence" (NLVR2),
  "sent" (referring expressions) or "caption"}. UNITER's input_ids come from its own BERT vocabulary, so
  the text is re-tokenised by the run's tokenizer: a txt_db without text is refused. meta.json,
  id2len.json, txt2img.json and img2txts.json are not needed (every example names its image).

One sample per text example, in key order: image_id = img_fname, caption_id = the text id.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data.builders import Entry, _check_common, _dedupe, _safe, check_box_args
from data.region_formats.record import (DECODE_ERRORS, LmdbRecordReader, RecordError, RegionRecord, array_field,
                                        build_from_records, image_id_of, lmdb_errors, lmdb_folder, lz4_decompress,
                                        open_lmdb, source_stat, unpack_msgpack)
from data.shards import caption_reason

TEXT_FIELDS = ("raw", "caption", "sentence", "sent")
"""Where UNITER's txt_db examples keep the text, by task (pretraining, captions, NLVR2, RE)."""
IMAGE_FIELDS = ("features", "norm_bb", "conf", "soft_labels")
MAX_TEXT_RECORD_BYTES = 1 << 20
"""A text example is a caption and its ids: far below this once decompressed."""


def _text_example(value: bytes) -> dict:
    """A txt_db value: an lz4 frame of msgpack holding a map."""
    if len(value) > MAX_TEXT_RECORD_BYTES:
        raise RecordError("record_too_large", f"{len(value)} bytes")
    example = unpack_msgpack(lz4_decompress(value, MAX_TEXT_RECORD_BYTES))
    if not isinstance(example, dict):
        raise RecordError("bad_record", "not a map")
    return example


def _caption_of(example: dict) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(image file name, text, None) or (.., .., skip reason) of one text example."""
    image_id = example.get("img_fname")
    image_id = image_id_of(image_id) if isinstance(image_id, str) else None  # NLVR2's pairs: not one image
    if image_id is None:
        return None, None, "bad_caption_entry"
    text = next((example[k] for k in TEXT_FIELDS if isinstance(example.get(k), str)), None)
    if text is None:
        return image_id, None, "missing_caption"
    return image_id, text, caption_reason(text)


def plan_texts(txt_db: Path, img_db: Path, skipped: Counter) -> list[Entry]:
    """One entry per usable text example whose image the img_db holds, in key order."""
    size, mtime = source_stat(img_db / "data.mdb")
    entries: list[Entry] = []
    with lmdb_errors(txt_db), open_lmdb(txt_db) as txt_env, open_lmdb(img_db) as img_env, \
            txt_env.begin(buffers=True) as txt, img_env.begin(buffers=True) as img:
        for key, value in txt.cursor():
            try:
                text_id = bytes(key).decode("utf-8")
                image_id, text, reason = _caption_of(_text_example(bytes(value)))
            except RecordError as e:  # a text example that cannot be read is a bad caption entry
                text_id, reason = None, "record_too_large" if e.reason == "record_too_large" else "bad_caption_entry"
            except DECODE_ERRORS:
                text_id, reason = None, "bad_caption_entry"
            if reason is None and image_id_of(text_id) is None:
                reason = "bad_caption_entry"
            if reason is None and img.get(image_id.encode("utf-8")) is None:
                reason = "unknown_image_id"
            if reason:
                skipped[reason] += 1
                continue
            entries.append(Entry(f"{_safe(image_id)}-{_safe(text_id)}", str(img_db / "data.mdb"), image_id, text,
                                 text_id, size, mtime, locator=image_id))
    if not entries and skipped["missing_caption"]:
        raise ValueError(f"txt_db {txt_db} holds no caption text ({skipped['missing_caption']} examples without "
                         f"any of {', '.join(TEXT_FIELDS)}): vlpt tokenises captions with the run's tokenizer and "
                         f"cannot reuse UNITER's input_ids; rebuild the txt_db keeping the text")
    return entries


class UniterImgReader(LmdbRecordReader):
    """Reads an img_db value (entry.locator: its key) into a RegionRecord."""

    fields = IMAGE_FIELDS

    def to_record(self, key: str, dump: dict[str, Any]) -> RegionRecord:
        return record_of(key, dump)


def record_of(image_id: str, dump: dict[str, Any]) -> RegionRecord:
    """One img_db dump's regions (arrays as UNITER stores them; a 7-column norm_bb loses its w*h)."""
    features = array_field(dump, "features", 2)  # [n, D]
    n = len(features)
    norm_bb = array_field(dump, "norm_bb", 2, n)  # [n, 6 or 7]
    if norm_bb.shape[1] not in (6, 7):
        raise RecordError("bad_shape", f"norm_bb of shape {list(norm_bb.shape)}")
    conf = array_field(dump, "conf", 1, n) if dump.get("conf") is not None else None
    soft = array_field(dump, "soft_labels", 2, n) if dump.get("soft_labels") is not None else None
    return RegionRecord(image_id, features, np.ascontiguousarray(norm_bb[:, :6]), conf, soft)


def build_uniter_lmdb_shards(img_db: str | Path, txt_db: str | Path, out: str | Path, *, conf_th: float = 0.2,
                             min_bb: int = 10, max_bb: int = 100, samples_per_shard: int = 1000, workers: int = 1,
                             progress: bool = False) -> dict:
    """UNITER img_db + txt_db -> region shards in `out`; a summary dict (as data.builders' builders)."""
    out = Path(out)
    _check_common(out, samples_per_shard, workers)
    check_box_args(conf_th, min_bb, max_bb)
    img, txt = lmdb_folder(img_db, "img_db"), lmdb_folder(txt_db, "txt_db")
    skipped: Counter = Counter()
    entries = _dedupe(plan_texts(txt, img, skipped), skipped)
    meta = {"source": "uniter-lmdb", "img_db": str(img), "txt_db": str(txt)}
    return build_from_records("uniter-lmdb", out, entries, skipped, meta, UniterImgReader, f"img_db {img}",
                              conf_th=conf_th, min_bb=min_bb, max_bb=max_bb, samples_per_shard=samples_per_shard,
                              workers=workers, progress=progress)
