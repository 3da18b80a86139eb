"""Hostile region-feature sources (data/region_formats): every bad record is skipped and counted by
reason, the good ones still make their shards, nothing is unpickled and nothing is read beyond the
record budget. Budgets are lowered here (monkeypatch, builds in this process) so that a bomb is small."""
from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from data.region_formats import butd_tsv, record
from data.region_formats.butd_tsv import build_butd_tsv_shards
from data.region_formats.lmdb_features import build_lmdb_feature_shards
from data.region_formats.uniter_lmdb import build_uniter_lmdb_shards
from tests.unit.test_region_formats import (_lmdb_put, b64, butd_row, d2_record, make_images, msgpack_numpy,
                                            shard_samples, txt_example, uniter_dump, write_captions,
                                            write_uniter_dbs)

FIELDS = "image_id,image_w,image_h,num_boxes,boxes,features,cls_prob,objects_conf"


class WritesFile:
    """Unpickling it would create `path`: the proof that nothing was unpickled is that it does not exist."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _pickled_npz(path: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, features=np.array([WritesFile(str(path))], dtype=object), norm_bb=np.zeros((1, 6), np.float32))
    return buf.getvalue()


def _row(im: dict, **override) -> str:
    names = FIELDS.split(",")
    values = dict(zip(names, butd_row(im)))
    values.update(override)
    return "\t".join(values[n] for n in names)


def test_butd_tsv_bad_rows_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(butd_tsv, "MAX_LINE", 8192)  # a row past it is skipped from its length
    images = make_images(15, seed=3)
    good, bad = images[:3], images[3:]
    nan = bad[4]["features"].copy()
    nan[0, 0] = np.nan
    soft = bad[8]["soft_labels"] * 2
    outside = bad[9]["boxes"].copy()
    outside[0, 2] = bad[9]["w"] * 3
    rows = [_row(im) for im in good] + [
        _row(bad[0], features="%%%not base64%%%"),                      # bad_record
        _row(bad[1], boxes=b64(bad[1]["boxes"][:, :3])),                 # bad_record: wrong length
        _row(bad[2], num_boxes="1000000000"),                           # too_many_boxes
        _row(bad[3], num_boxes="0"),                                    # no_regions
        _row(bad[4], features=b64(nan)),                                # nonfinite_features
        _row(bad[5], image_w="0"),                                      # bad_image_size
        _row(bad[6], image_h="nan"),                                    # bad_image_size
        "\t".join(butd_row(bad[7])[:4]),                                # bad_record: fields missing
        _row(bad[8], cls_prob=b64(soft)),                               # bad_soft_labels
        _row(bad[9], boxes=b64(outside)),                               # bad_boxes
        _row(bad[10], features="A" * 20000),                            # record_too_large (longer than MAX_LINE)
        _row(bad[11], num_boxes="three"),                               # bad_record
        _row(good[0]),                                                  # duplicate_image_id
    ]
    tsv = tmp_path / "f.tsv"
    tsv.write_bytes(("\n".join(rows) + "\n").encode() + b"\xff\xfe\tnot utf-8\n")  # bad_record
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    summary = build_butd_tsv_shards(tsv, caps, tmp_path / "out", fields=FIELDS)
    assert summary["num_samples"] == 3
    assert summary["skipped"] == {"bad_record": 5, "too_many_boxes": 1, "no_regions": 1, "nonfinite_features": 1,
                                  "bad_image_size": 2, "bad_soft_labels": 1, "bad_boxes": 1, "record_too_large": 1,
                                  "duplicate_image_id": 1, "unknown_image_id": 2}
    assert sorted(m["image_id"] for m, _ in shard_samples(tmp_path / "out").values()) == [im["image_id"] for im in good]


def test_butd_tsv_bad_fields_argument():
    with pytest.raises(ValueError, match="must name each of"):
        butd_tsv.field_names("image_id,boxes")


def test_uniter_hostile_records(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 1 << 20)
    import lz4.frame
    import msgpack

    images = make_images(4, seed=5)
    marker = tmp_path / "unpickled"
    nan = dict(images[0], features=np.full_like(images[0]["features"], np.inf))
    fields = lambda **kw: msgpack.packb({k: msgpack_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
                                        for k, v in kw.items()}, use_bin_type=True)
    n = len(images[1]["features"])
    bad_img = {
        b"garbage.npz": b"\x00\x01 not msgpack nor npz",                                       # bad_record
        b"pickled.npz": _pickled_npz(marker),                                                   # bad_record
        b"object.npz": fields(features={**msgpack_numpy(images[1]["features"]), b"type": "|O"},
                              norm_bb=np.zeros((n, 6), np.float32)),                           # bad_shape
        b"rows.npz": fields(features=images[1]["features"], norm_bb=np.zeros((n + 1, 6), np.float32)),  # bad_shape
        b"inf.npz": uniter_dump(nan, npz=False),                                                # nonfinite_features
        b"bomb.npz": lz4.frame.compress(b"\x00" * (4 << 20)),                                   # record_too_large
        b"nested.npz": b"\x91" * 100_000 + b"\xc0",                                             # bad_record (stack)
        b"nobb.npz": fields(features=images[1]["features"]),                                    # missing_field
    }
    bad_txt = {f"b{i}".encode(): txt_example({"raw": "a red cube", "img_fname": k.decode()})
               for i, k in enumerate(bad_img)}
    bad_txt.update({
        b"t1": b"not lz4",                                                                      # bad_caption_entry
        b"t2": txt_example({"raw": "a red cube", "img_fname": ["a.npz", "b.npz"]}),            # bad_caption_entry
        b"t3": txt_example({"raw": "a red\x00cube", "img_fname": "coco_img000.npz"}),         # bad_caption
        b"t4": txt_example({"raw": "a red cube", "img_fname": "nowhere.npz"}),                 # unknown_image_id
        b"t5": txt_example(["not", "a", "map"]),                                                # bad_caption_entry
        b"t6": txt_example({"input_ids": [1, 2], "img_fname": "coco_img000.npz"}),             # missing_caption
        b"t7": lz4.frame.compress(b"\x00" * (2 << 20)),                                         # record_too_large
        b"\xff\xfe": txt_example({"raw": "a red cube", "img_fname": "coco_img000.npz"}),       # bad_caption_entry
    })
    img_db, txt_db = write_uniter_dbs(tmp_path, images, per_image=1, extra_txt=bad_txt, extra_img=bad_img)
    summary = build_uniter_lmdb_shards(img_db, txt_db, tmp_path / "out")
    assert summary["num_samples"] == 4
    assert summary["skipped"] == {"bad_record": 3, "bad_shape": 2, "nonfinite_features": 1, "record_too_large": 2,
                                  "missing_field": 1, "bad_caption_entry": 4, "bad_caption": 1,
                                  "unknown_image_id": 1, "missing_caption": 1}
    assert not marker.exists()


def test_lmdb_features_hostile_records(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 1 << 20)
    import msgpack

    images = make_images(12, seed=7, conf=False, soft=False)  # the dataset's fields: features and boxes
    good, bad = images[:3], images[3:]
    pack = lambda **kw: msgpack.packb({k: msgpack_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
                                      for k, v in kw.items()}, use_bin_type=True)
    im = bad[0]
    frame = {"resized_width": im["w"], "resized_height": im["h"]}
    outside = im["boxes"].copy()
    outside[0, 3] = im["h"] * 2
    items = {im["image_id"].encode(): d2_record(im, 1.0) for im in good}
    items.update({
        bad[0]["image_id"].encode(): pack(features=im["features"], **frame),                     # missing_field
        bad[1]["image_id"].encode(): pack(features=im["features"], boxes=outside, **frame),       # bad_boxes
        bad[2]["image_id"].encode(): pack(features=im["features"], boxes=im["boxes"], num_boxes=999,
                                          **frame),                                               # bad_shape
        bad[3]["image_id"].encode(): pack(features=im["features"], boxes=im["boxes"], image_width=im["w"],
                                          image_height=im["h"], scale=0.0),                       # bad_image_size
        bad[4]["image_id"].encode(): pack(features=[[1.0, 2.0], [3.0]], boxes=im["boxes"], **frame),  # bad_record
        bad[5]["image_id"].encode(): msgpack.packb(12),                                            # bad_record
        bad[6]["image_id"].encode(): b"\x00" * (2 << 20),                                          # record_too_large
        bad[7]["image_id"].encode(): _pickled_npz(tmp_path / "unpickled"),                         # bad_record
        bad[8]["image_id"].encode(): pack(features=im["features"], boxes=im["boxes"], scores=np.ones(2, np.float32),
                                          **frame),                                                 # bad_shape
        b"\xff\xfe": d2_record(good[0], 1.0),                                                       # bad_record (key)
    })
    folder = _lmdb_put(tmp_path / "d2", items)
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    summary = build_lmdb_feature_shards(folder, caps, tmp_path / "out")
    assert summary["num_samples"] == 3
    assert summary["skipped"] == {"missing_field": 1, "bad_boxes": 1, "bad_shape": 2, "bad_image_size": 1,
                                  "bad_record": 4, "record_too_large": 1}
    assert not (tmp_path / "unpickled").exists()


def test_no_usable_record_is_one_line(tmp_path):
    images = make_images(2)
    tsv = tmp_path / "f.tsv"
    tsv.write_text("\n".join(_row(im, features="!!") for im in images) + "\n")
    caps = write_captions(tmp_path / "caps.json", images)
    with pytest.raises(ValueError, match="has usable region features"):
        build_butd_tsv_shards(tsv, caps, tmp_path / "out", fields=FIELDS)


def test_pickle_marker_works():
    """The WritesFile marker does write its file when unpickled (so its absence above means something)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "x"
        pickle.loads(pickle.dumps(WritesFile(str(target))))
        assert target.exists()
    assert base64 and json  # used by the module's helpers


def test_a_damaged_lmdb_is_one_line(tmp_path):
    from tests.conftest import run_vlpt

    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "data.mdb").write_bytes(b"\x00garbage" * 1000)
    caps = write_captions(tmp_path / "caps.json", make_images(1))
    proc = run_vlpt(["shards", "lmdb-features", "--lmdb", str(tmp_path / "d2"), "--captions", str(caps), "--out",
                     str(tmp_path / "o"), "--no-progress"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be read" in lines[0] and str(tmp_path / "d2") in lines[0], proc.stderr
