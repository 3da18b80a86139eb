"""Region features as they come (data/region_formats): bottom-up-attention TSV, UNITER's img_db + txt_db,
detectron2-style LMDB. Fixtures are written here in each format, converted with `vlpt shards ...`, and
the shards must hold exactly the inputs: features, normalised boxes, conf and soft labels where present,
captions. The writers are imported by the integration and adversarial tests."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from data.region_formats.record import decode_ndarray, normalise_boxes
from data.shards import FORMAT, iter_shard, read_manifest, read_region_npz
from tests.conftest import run_vlpt

IMG_DIM, LABEL_DIM = 16, 9
CAPTIONS = ["a red cube left of a blue ball", "a green cone above a yellow cube", "a blue ball below a green cube",
            "a yellow cone right of a red ball"]


# ---------------------------------------------------------------- fixtures in each format

def make_images(n_images: int = 5, seed: int = 0, conf: bool = True, soft: bool = True) -> list[dict]:
    """Per image: id, pixel size, pixel boxes [n, 4], features [n, D] float32 (exact in fp16), conf [n]
    sorted descending (so the builder's selection keeps the order), soft labels [n, K] summing to 1."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        n = int(rng.integers(3, 9))
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
        logits = rng.normal(size=(n, LABEL_DIM))
        images.append({
            "image_id": f"img{i:03d}", "w": w, "h": h, "boxes": boxes.astype(np.float32),
            "features": rng.normal(size=(n, IMG_DIM)).astype(np.float16).astype(np.float32),
            "conf": np.sort(rng.uniform(0.3, 1.0, n)).astype(np.float32)[::-1].copy() if conf else None,
            "soft_labels": (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32) if soft else None,
        })
    return images


def write_captions(path: Path, images: list[dict], per_image: int = 2) -> Path:
    rows = [{"image_id": im["image_id"], "caption": CAPTIONS[(i + k) % len(CAPTIONS)]}
            for i, im in enumerate(images) for k in range(per_image)]
    path.write_text(json.dumps(rows))
    return path


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def butd_row(im: dict) -> list[str]:
    row = [im["image_id"], str(im["w"]), str(im["h"]), str(len(im["boxes"])), b64(im["boxes"]), b64(im["features"])]
    if im["soft_labels"] is not None:
        row.append(b64(im["soft_labels"]))
    if im["conf"] is not None:
        row.append(b64(im["conf"]))
    return row


def butd_fields(im: dict) -> str:
    names = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    names += ["cls_prob"] * (im["soft_labels"] is not None) + ["objects_conf"] * (im["conf"] is not None)
    return ",".join(names)


def write_butd_tsv(path: Path, images: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    lines = ["\t".join(butd_row(im)) for im in images] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def msgpack_numpy(a: np.ndarray) -> dict:
    """An array the way msgpack_numpy.encode writes it."""
    a = np.ascontiguousarray(a)
    return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}


def _lmdb_put(folder: Path, items: dict[bytes, bytes]) -> Path:
    import lmdb

    folder.mkdir(parents=True, exist_ok=True)
    with lmdb.open(str(folder), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    return folder


def norm_bb(im: dict) -> np.ndarray:
    b, w, h = im["boxes"].astype(np.float64), im["w"], im["h"]
    return np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, (b[:, 2] - b[:, 0]) / w,
                     (b[:, 3] - b[:, 1]) / h], 1).astype(np.float32)


def uniter_dump(im: dict, npz: bool) -> bytes:
    """One img_db value as UNITER's convert_imgdir.py writes it: fp16 arrays (features, norm_bb, conf,
    soft_labels), np.savez_compressed for `--compress`, else msgpack with msgpack_numpy arrays."""
    import msgpack

    dump = {"features": im["features"].astype(np.float16), "norm_bb": norm_bb(im).astype(np.float16)}
    if im["conf"] is not None:
        dump["conf"] = im["conf"].astype(np.float16)
    if im["soft_labels"] is not None:
        dump["soft_labels"] = im["soft_labels"].astype(np.float16)
    if npz:
        buf = io.BytesIO()
        np.savez_compressed(buf, **dump)
        return buf.getvalue()
    return msgpack.packb({k: msgpack_numpy(v) for k, v in dump.items()}, use_bin_type=True)


def txt_example(value: dict) -> bytes:
    """A txt_db value as UNITER's TxtLmdb writes it: lz4.frame.compress(msgpack.dumps(example, use_bin_type=True))."""
    import lz4.frame
    import msgpack

    return lz4.frame.compress(msgpack.packb(value, use_bin_type=True))


def write_uniter_dbs(root: Path, images: list[dict], per_image: int = 2, text_field: str = "raw",
                     extra_txt: dict[bytes, bytes] | None = None,
                     extra_img: dict[bytes, bytes] | None = None) -> tuple[Path, Path]:
    """img_db/<feat_th0.2_max100_min10_compressed>/ (keys: file names, + __keys__) and txt_db/ (ids -> examples)
    plus the JSON side files, in UNITER's layout; even images as npz, odd as msgpack."""
    fnames = [f"coco_{im['image_id']}.npz" for im in images]
    items = {f.encode(): uniter_dump(im, npz=i % 2 == 0) for i, (f, im) in enumerate(zip(fnames, images))}
    items[b"__keys__"] = json.dumps(fnames).encode()
    img_db = root / "img_db"
    _lmdb_put(img_db / "feat_th0.2_max100_min10_compressed", {**items, **(extra_img or {})})
    nbb = {f: len(im["boxes"]) for f, im in zip(fnames, images)}
    (img_db / "nbb_th0.2_max100_min10.json").write_text(json.dumps(nbb))
    texts, id2len, txt2img = {}, {}, {}
    for i, (f, im) in enumerate(zip(fnames, images)):
        for k in range(per_image):
            tid = f"{i * 10 + k}"
            caption = CAPTIONS[(i + k) % len(CAPTIONS)]
            texts[tid.encode()] = txt_example({"id": tid, "dataset": "coco", text_field: caption,
                                               "input_ids": [101 + j for j in range(len(caption.split()))],
                                               "img_fname": f})
            id2len[tid], txt2img[tid] = len(caption.split()), f
    txt_db = root / "txt_db"
    _lmdb_put(txt_db, {**texts, **(extra_txt or {})})
    (txt_db / "meta.json").write_text(json.dumps({"CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, 28996]}))
    (txt_db / "id2len.json").write_text(json.dumps(id2len))
    (txt_db / "txt2img.json").write_text(json.dumps(txt2img))
    return img_db, txt_db


def d2_record(im: dict, scale: float, npz: bool = False, how: str = "resized") -> bytes:
    """A detectron2-style record: boxes in the frame resized by `scale`, the frame given as its size
    (`how` "resized") or as original size x scale ("scale")."""
    import lz4.frame
    import msgpack

    fields = {"features": im["features"], "boxes": (im["boxes"].astype(np.float64) * scale).astype(np.float32),
              "num_boxes": len(im["boxes"])}
    if how == "resized":
        fields.update(resized_width=im["w"] * scale, resized_height=im["h"] * scale)
    else:
        fields.update(image_width=im["w"], image_height=im["h"], scale=scale)
    if im["conf"] is not None:
        fields["scores"] = im["conf"]
    if im["soft_labels"] is not None:
        fields["cls_prob"] = im["soft_labels"]
    if npz:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in fields.items()})
        return buf.getvalue()
    packed = msgpack.packb({k: msgpack_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()},
                           use_bin_type=True)
    return lz4.frame.compress(packed) if scale > 1.5 else packed


def write_d2_lmdb(folder: Path, images: list[dict], extra: dict[bytes, bytes] | None = None) -> Path:
    items = {im["image_id"].encode(): d2_record(im, scale=1.0 + 0.5 * i, npz=i % 3 == 2,
                                                 how="scale" if i % 2 else "resized")
             for i, im in enumerate(images)}
    items[b"__keys__"] = json.dumps([im["image_id"] for im in images]).encode()
    return _lmdb_put(folder, {**items, **(extra or {})})


# ---------------------------------------------------------------- reading the shards back

def shard_samples(out: Path) -> dict[str, tuple[dict, dict]]:
    """{caption_id: (json meta, npz arrays)} of every sample of the region shards in `out`."""
    m = read_manifest(out)
    samples = {}
    for path in m.shards:
        for raw in iter_shard(path):
            meta = json.loads(raw["json"])
            arrays, reason = read_region_npz(io.BytesIO(raw["npz"]), 1 << 28)
            assert reason is None
            samples[meta["caption_id"]] = (meta, arrays)
    return samples


def check_same(arrays: dict, im: dict, boxes_atol: float = 1e-6) -> None:
    np.testing.assert_array_equal(arrays["features"].astype(np.float32), im["features"])
    np.testing.assert_allclose(arrays["norm_bb"], norm_bb(im), atol=boxes_atol)
    for k in ("conf", "soft_labels"):
        if im[k] is None:
            assert k not in arrays
        else:  # stored as the schema's dtypes: conf fp32, soft labels fp16
            np.testing.assert_allclose(arrays[k].astype(np.float32), im[k], rtol=1e-3, atol=1e-3 if k == "soft_labels"
                                       else 1e-7)


def shards(args: list[str]) -> str:
    return run_vlpt(["shards", *args, "--no-progress"]).stdout


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("conf,soft", [(True, True), (False, False), (True, False)])
def test_butd_tsv_round_trip(tmp_path, conf, soft):
    images = make_images(conf=conf, soft=soft)
    tsv = write_butd_tsv(tmp_path / "feats.tsv", images)
    caps = write_captions(tmp_path / "caps.json", images)
    out = tmp_path / "out"
    stdout = shards(["butd-tsv", "--tsv", str(tsv), "--fields", butd_fields(images[0]), "--captions", str(caps),
                     "--out", str(out), "--samples-per-shard", "3"])
    assert "10 samples in 4 shards" in stdout
    m = read_manifest(out)
    expected = ["features", "norm_bb"] + ["conf"] * conf + ["soft_labels"] * soft
    assert list(m.fields) == expected and m.has_soft_labels == soft
    assert (m.img_dim, m.label_dim) == (IMG_DIM, LABEL_DIM if soft else 0)
    got = shard_samples(out)
    by_id = {im["image_id"]: im for im in images}
    assert sorted(got) == sorted(f"{im['image_id']}-{k}" for im in images for k in range(2))
    for meta, arrays in got.values():
        check_same(arrays, by_id[meta["image_id"]])
    rows = json.loads((tmp_path / "caps.json").read_text())
    assert sorted(meta["caption"] for meta, _ in got.values()) == sorted(r["caption"] for r in rows)


def test_butd_tsv_header_line_and_several_files(tmp_path):
    images = make_images(4)
    header = butd_fields(images[0]).replace(",", "\t")
    a = tmp_path / "a.tsv"
    a.write_text(header + "\n" + "\n".join("\t".join(butd_row(im)) for im in images[:2]) + "\n")
    b = write_butd_tsv(tmp_path / "b.tsv", images[2:])  # no header: the --fields given
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    out = tmp_path / "out"
    shards(["butd-tsv", "--tsv", str(a), str(b), "--fields", butd_fields(images[0]), "--captions", str(caps),
            "--out", str(out)])
    got = shard_samples(out)
    assert len(got) == 4
    for meta, arrays in got.values():
        check_same(arrays, next(im for im in images if im["image_id"] == meta["image_id"]))


def test_butd_tsv_lxmert_preset(tmp_path):
    """LXMERT's field order (img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, ...)."""
    images = make_images(3, soft=False)
    lines = []
    for im in images:
        n = len(im["boxes"])
        ids = base64.b64encode(np.zeros(n, np.int64).tobytes()).decode()
        lines.append("\t".join([im["image_id"], str(im["h"]), str(im["w"]), ids, b64(im["conf"]), ids, b64(im["conf"]),
                                str(n), b64(im["boxes"]), b64(im["features"])]))
    tsv = tmp_path / "lx.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    shards(["butd-tsv", "--tsv", str(tsv), "--fields", "lxmert", "--captions", str(caps), "--out", str(tmp_path / "o")])
    for meta, arrays in shard_samples(tmp_path / "o").values():
        check_same(arrays, next(im for im in images if im["image_id"] == meta["image_id"]))


def test_box_selection_keeps_most_confident(tmp_path):
    images = make_images(2)
    tsv = write_butd_tsv(tmp_path / "f.tsv", images)
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    shards(["butd-tsv", "--tsv", str(tsv), "--fields", butd_fields(images[0]), "--captions", str(caps),
            "--out", str(tmp_path / "o"), "--min-bb", "1", "--max-bb", "2"])
    for meta, arrays in shard_samples(tmp_path / "o").values():
        im = next(im for im in images if im["image_id"] == meta["image_id"])
        np.testing.assert_array_equal(arrays["conf"], im["conf"][:2])  # conf sorted descending in the fixture


@pytest.mark.parametrize("conf,soft", [(True, True), (False, False)])
def test_uniter_lmdb_round_trip(tmp_path, conf, soft):
    images = make_images(conf=conf, soft=soft)
    img_db, txt_db = write_uniter_dbs(tmp_path, images)
    out = tmp_path / "out"
    stdout = shards(["uniter-lmdb", "--img-db", str(img_db), "--txt-db", str(txt_db), "--out", str(out)])
    assert "10 samples in 1 shards" in stdout
    m = read_manifest(out)
    assert m.has_soft_labels == soft and ("conf" in m.fields) == conf
    got = shard_samples(out)
    assert len(got) == 10
    for tid, (meta, arrays) in got.items():
        i, k = divmod(int(tid), 10)
        assert meta["image_id"] == f"coco_{images[i]['image_id']}.npz"
        assert meta["caption"] == CAPTIONS[(i + k) % len(CAPTIONS)]
        im = dict(images[i])  # stored as fp16 by UNITER
        im.update({key: im[key].astype(np.float16).astype(np.float32) for key in ("conf", "soft_labels")
                   if im[key] is not None})
        check_same(arrays, im, boxes_atol=1e-3)


def test_uniter_lmdb_text_fields_and_refusal(tmp_path):
    images = make_images(2)
    img_db, txt_db = write_uniter_dbs(tmp_path / "a", images, text_field="sentence")
    shards(["uniter-lmdb", "--img-db", str(img_db / "feat_th0.2_max100_min10_compressed"), "--txt-db", str(txt_db),
            "--out", str(tmp_path / "o")])
    assert len(shard_samples(tmp_path / "o")) == 4
    img_db, txt_db = write_uniter_dbs(tmp_path / "b", images, text_field="toked_caption")  # no text vlpt can read
    proc = run_vlpt(["shards", "uniter-lmdb", "--img-db", str(img_db), "--txt-db", str(txt_db), "--out",
                     str(tmp_path / "p"), "--no-progress"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no caption text" in lines[0] and "input_ids" in lines[0], proc.stderr


def test_lmdb_features_round_trip(tmp_path):
    images = make_images(6)
    folder = write_d2_lmdb(tmp_path / "d2", images)
    caps = write_captions(tmp_path / "caps.json", images)
    out = tmp_path / "out"
    stdout = shards(["lmdb-features", "--lmdb", str(folder), "--captions", str(caps), "--out", str(out)])
    assert "12 samples" in stdout
    got = shard_samples(out)
    assert len(got) == 12
    for meta, arrays in got.values():
        check_same(arrays, next(im for im in images if im["image_id"] == meta["image_id"]), boxes_atol=2e-6)


def test_lmdb_features_without_frame_size_names_the_field(tmp_path):
    images = make_images(2)
    import msgpack

    items = {im["image_id"].encode(): msgpack.packb({"features": msgpack_numpy(im["features"]),
                                                    "boxes": msgpack_numpy(im["boxes"]), "image_width": im["w"],
                                                    "image_height": im["h"]}, use_bin_type=True) for im in images}
    folder = _lmdb_put(tmp_path / "d2", items)
    caps = write_captions(tmp_path / "caps.json", images)
    proc = run_vlpt(["shards", "lmdb-features", "--lmdb", str(folder), "--captions", str(caps), "--out",
                     str(tmp_path / "o"), "--no-progress"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "resized_width" in lines[0] and "scale" in lines[0], proc.stderr


def test_rerun_reuses_shards(tmp_path):
    images = make_images(4)
    tsv = write_butd_tsv(tmp_path / "f.tsv", images)
    caps = write_captions(tmp_path / "caps.json", images)
    args = ["butd-tsv", "--tsv", str(tsv), "--fields", butd_fields(images[0]), "--captions", str(caps),
            "--out", str(tmp_path / "o"), "--samples-per-shard", "3"]
    shards(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").glob("shard-*.tar")}
    assert "(0 built, 3 already done)" in shards(args)
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "o").glob("shard-*.tar")}


# ---------------------------------------------------------------- the pieces

def test_normalise_boxes_is_uniters_layout():
    bb = normalise_boxes(np.array([[10, 20, 110, 70]], np.float32), 200, 100)
    np.testing.assert_allclose(bb, [[0.05, 0.2, 0.55, 0.7, 0.5, 0.5]])


def test_decode_ndarray_takes_msgpack_numpy_and_refuses_objects():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    np.testing.assert_array_equal(decode_ndarray(msgpack_numpy(a)), a)
    str_keys = {k.decode(): v for k, v in msgpack_numpy(a).items()}
    np.testing.assert_array_equal(decode_ndarray(str_keys), a)
    from data.region_formats.record import RecordError

    for bad in ({**msgpack_numpy(a), b"type": "|O"}, {**msgpack_numpy(a), b"shape": [4, 3]},
                {**msgpack_numpy(a), b"type": "<U3"}, {b"nd": True}, "text"):
        with pytest.raises(RecordError):
            decode_ndarray(bad)


def test_manifest_records_fields_and_old_manifests_carry_all(tmp_path):
    from data.shards import REGION_FIELDS

    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "img_dim": 4, "label_dim": 3,
                                                        "shards": [{"path": "s.tar", "num_samples": 1}]}))
    assert read_manifest(tmp_path).fields == REGION_FIELDS
    for fields, label_dim, error in ((["features"], 0, "must hold"), (["features", "norm_bb", "x"], 0, "must hold"),
                                     (["features", "norm_bb", "soft_labels"], 0, "label_dim is 0")):
        (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "img_dim": 4, "label_dim": label_dim,
                                                            "fields": fields,
                                                            "shards": [{"path": "s.tar", "num_samples": 1}]}))
        with pytest.raises(ValueError, match=error):
            read_manifest(tmp_path)


def test_workers_give_the_same_bytes(tmp_path):
    """The readers go to the builder's worker processes (spawned): same shards for any --workers."""
    images = make_images(6)
    img_db, txt_db = write_uniter_dbs(tmp_path, images)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        shards(["uniter-lmdb", "--img-db", str(img_db), "--txt-db", str(txt_db), "--out", str(out),
                "--samples-per-shard", "4", "--workers", workers])
        outs.append({p.name: p.read_bytes() for p in out.glob("shard-*.tar")})
    assert len(outs[0]) == 3 and outs[0] == outs[1]


def test_decoded_without_soft_labels_feeds_mrfr(tmp_path):
    from data.collate import collate_mrm
    from data.shards import decode_region_sample
    from data.tokenizer import load_tokenizer

    images = make_images(3, conf=False, soft=False)
    tsv = write_butd_tsv(tmp_path / "f.tsv", images)
    caps = write_captions(tmp_path / "caps.json", images, per_image=1)
    shards(["butd-tsv", "--tsv", str(tsv), "--fields", butd_fields(images[0]), "--captions", str(caps),
            "--out", str(tmp_path / "o")])
    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "data/vocab/demo-vocab.txt")
    m = read_manifest(tmp_path / "o")
    samples = [decode_region_sample(raw, tok, 60, IMG_DIM)[0] for p in m.shards for raw in iter_shard(p)]
    assert all(s is not None and s.soft_labels.shape == (len(s.img_feat), 0) for s in samples)
    batch = collate_mrm(samples, np.random.default_rng(0), tok, task="mrfr")
    assert batch["mrfr_targets"].shape == (batch["n_items"], IMG_DIM) and batch["n_items"] >= 3
    raw = next(iter_shard(m.shards[0]))
    assert decode_region_sample(raw, tok, 60, IMG_DIM, label_dim=LABEL_DIM) == (None, "missing_field")
