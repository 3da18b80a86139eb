"""`vlpt shards coco|regions|tsv`: shard builders, manifests, resume, determinism, bad inputs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import builders
from data.builders import build_coco_shards, build_region_shards, build_tsv_shards, select_regions
from data.shards import (
    FORMAT, PIXEL_FORMAT, decode_region_sample, file_sha256, iter_shard, read_manifest, verify_manifest,
)
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from vlpt.cli import main

IMG_DIM, LABEL_DIM = 16, 5
REGION_ARGS = dict(conf_th=0.5, min_bb=4, max_bb=8)


def _jpeg(path: Path, colour: tuple[int, int, int], size=(8, 6), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _samples(out: Path, fmt: str = PIXEL_FORMAT) -> list[dict]:
    return [raw for p in read_manifest(out, fmt).shards for raw in iter_shard(p)]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


# ---------------------------------------------------------------- inputs

@pytest.fixture
def coco(tmp_path) -> dict:
    img = tmp_path / "images"
    files = {1: _jpeg(img / "a.jpg", (255, 0, 0)), 2: _jpeg(img / "sub" / "b.jpg", (0, 255, 0), (5, 9)),
             3: _jpeg(img / "c.png", (0, 0, 255), fmt="PNG"), 4: _jpeg(img / "d.jpeg", (9, 9, 9))}
    (img / "bad.jpg").write_bytes(b"not a jpeg at all")
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.jpg"}, {"id": 3, "file_name": "c.png"},
              {"id": 4, "file_name": "d.jpeg"}, {"id": 5, "file_name": "gone.jpg"}, {"id": 6, "file_name": "bad.jpg"},
              {"id": 7, "file_name": "e.gif"}]
    good = [{"image_id": 1, "id": 10, "caption": "a red square"}, {"image_id": 1, "id": 11, "caption": "red, again "},
            {"image_id": 2, "id": 20, "caption": "ein grünes Bild"}, {"image_id": 3, "id": 30, "caption": "blue png"},
            {"image_id": 4, "id": 40, "caption": "dark"}, {"image_id": 4, "id": 41, "caption": "very dark"}]
    bad = [{"image_id": 5, "id": 50, "caption": "file is missing"},  # missing_image
           {"image_id": 6, "id": 60, "caption": "not a jpeg"},  # bad_image
           {"image_id": 7, "id": 70, "caption": "a gif"},  # unsupported_image_type
           {"image_id": 99, "id": 990, "caption": "no such image"},  # unknown_image_id
           {"image_id": 1, "id": 10, "caption": "same id twice"},  # duplicate_caption_id
           {"image_id": 1, "id": 12, "caption": "   "},  # empty_caption
           {"image_id": 1, "id": 13},  # bad_caption_entry
           "not even a dict"]  # bad_caption_entry
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": good[:3] + bad + good[3:]}))
    return {"captions": captions, "images": img, "files": files, "good": good,
            "skipped": {"missing_image": 1, "bad_image": 1, "unsupported_image_type": 1, "unknown_image_id": 1,
                        "duplicate_caption_id": 1, "empty_caption": 1, "bad_caption_entry": 2}}


def _regions(rng: np.random.Generator, conf: np.ndarray, img_dim: int = IMG_DIM) -> dict:
    n = len(conf)
    return {"features": rng.standard_normal((n, img_dim)).astype(np.float16),
            "norm_bb": rng.uniform(0, 1, (n, 6)).astype(np.float32), "conf": conf.astype(np.float32),
            "soft_labels": rng.dirichlet(np.ones(LABEL_DIM), n).astype(np.float16)}


@pytest.fixture
def regions(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    feat = tmp_path / "feats"
    feat.mkdir()
    arrays = {
        "normal": _regions(rng, rng.permutation(np.linspace(0.05, 0.95, 12))),  # 6 above 0.5: keep 6
        "few": _regions(rng, np.array([0.3, 0.9, 0.1])),  # fewer than min_bb: keep all 3
        "lowconf": _regions(rng, rng.uniform(0.0, 0.4, 15)),  # none above 0.5: keep min_bb = 4
        "many": _regions(rng, rng.uniform(0.6, 1.0, 20)),  # 20 above 0.5: keep max_bb = 8
        "1": _regions(rng, np.array([0.9, 0.2, 0.7, 0.7, 0.1])),  # ties keep file order; int COCO id
    }
    for name, a in arrays.items():
        np.savez(feat / f"{name}.npz", **a)
    np.savez(feat / "widedim.npz", **_regions(rng, rng.uniform(0, 1, 6), img_dim=IMG_DIM + 1))
    nan = _regions(rng, rng.uniform(0, 1, 6))
    nan["features"][2, 3] = np.nan
    np.savez(feat / "nan.npz", **nan)
    np.savez(feat / "nofield.npz", features=nan["features"])
    (feat / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    caps = ["a red cube left of a blue ball", "a green cone above a white ring", "there is a red disk and a blue star"]
    good = [{"image_id": "normal", "caption": caps[0]}, {"image_id": "normal", "caption": caps[1]},
            {"image_id": "few", "caption": caps[2]}, {"image_id": "lowconf", "caption": caps[0]},
            {"image_id": "many", "caption": caps[1]}, {"image_id": 1, "caption": caps[2], "caption_id": "x.1"}]
    bad = [{"image_id": "absent", "caption": caps[0]}, {"image_id": "widedim", "caption": caps[0]},
           {"image_id": "nan", "caption": caps[0]}, {"image_id": "nofield", "caption": caps[0]},
           {"image_id": "broken", "caption": caps[0]}, {"image_id": "normal", "caption": 7}, {"caption": caps[0]}]
    captions = tmp_path / "region_captions.json"
    captions.write_text(json.dumps(good[:2] + bad + good[2:]))
    return {"features": feat, "captions": captions, "arrays": arrays, "good": good,
            "skipped": {"missing_npz": 1, "wrong_feature_dim": 1, "nonfinite_features": 1, "missing_field": 1,
                        "bad_npz": 1, "bad_caption_entry": 2}}


@pytest.fixture
def tsv(tmp_path) -> dict:
    root = tmp_path / "cc"
    files = {"imgs/a.jpg": _jpeg(root / "imgs" / "a.jpg", (1, 2, 3)),
             "imgs/b.jpg": _jpeg(root / "imgs" / "b.jpg", (200, 0, 9))}
    lines = ["imgs/a.jpg\ta photo of a thing", "./imgs/../imgs/a.jpg\tthe same photo, again",
             "imgs/b.jpg\tanother\tone",
             "", "imgs/missing.jpg\tnot there", "no tab on this line", "imgs/b.jpg\t  ", "imgs/a.txt\twrong type"]
    path = root / "data.tsv"
    path.write_text("\n".join(lines) + "\n")
    return {"tsv": path, "files": files,
            "expected": [("line-000000001", "imgs/a.jpg", "a photo of a thing"),
                         ("line-000000002", "imgs/a.jpg", "the same photo, again"),
                         ("line-000000003", "imgs/b.jpg", "another\tone")],
            "skipped": {"missing_image": 1, "bad_line": 1, "empty_caption": 1, "unsupported_image_type": 1}}


def _build(kind: str, inputs: dict, out: Path, **kw) -> dict:
    if kind == "coco":
        return build_coco_shards(inputs["captions"], inputs["images"], out, **kw)
    if kind == "regions":
        return build_region_shards(inputs["features"], inputs["captions"], out, **REGION_ARGS, **kw)
    return build_tsv_shards(inputs["tsv"], out, **kw)


# ---------------------------------------------------------------- content round trips

def _check_manifest(out: Path, fmt: str, summary: dict) -> None:
    m = read_manifest(out, fmt)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == fmt and verify_manifest(m) == []
    assert m.counts == [sum(1 for _ in iter_shard(p)) for p in m.shards]
    assert [s["bytes"] for s in raw["shards"]] == [Path(p).stat().st_size for p in m.shards]
    assert [s["sha256"] for s in raw["shards"]] == [file_sha256(p) for p in m.shards]
    assert m.num_samples == raw["num_samples"] == summary["num_samples"]
    assert raw["skipped"] == summary["skipped"]
    assert not list(out.glob(".*.tmp"))


def test_coco_cli_round_trip(coco, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["shards", "coco", "--captions", str(coco["captions"]), "--images", str(coco["images"]), "--out", str(out),
            "--samples-per-shard", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 samples in 2 shards (2 built, 0 already done)" in printed and "missing_image=1" in printed
    assert "4 pictures, 6 picture-caption pairs" in printed
    summary = json.loads((out / "manifest.json").read_text())
    _check_manifest(out, PIXEL_FORMAT, {"num_samples": 4, "skipped": coco["skipped"]})
    assert summary["skipped"] == coco["skipped"]
    # one sample per picture, planned in order of first caption: 1, 2, 6 (bad.jpg, fails), 3 | 4
    assert [s["num_samples"] for s in summary["shards"]] == [3, 1]
    assert [s["num_pairs"] for s in summary["shards"]] == [4, 2] and summary["num_pairs"] == 6
    samples = _samples(out)
    by_image: dict = {}
    for g in coco["good"]:
        by_image.setdefault(str(g["image_id"]), []).append(g)
    assert [json.loads(s["json"]) for s in samples] == [
        {"image_id": i, "captions": [g["caption"] for g in gs], "caption_ids": [str(g["id"]) for g in gs]}
        for i, gs in by_image.items()]
    assert [s["__key__"] for s in samples] == ["1-10", "2-20", "3-30", "4-40"]
    for s in samples:
        image_id = int(json.loads(s["json"])["image_id"])
        ext = "png" if image_id == 3 else "jpg"
        assert set(s) == {"__key__", "__url__", "__offset__", "__end__", "json", ext}
        assert s[ext] == coco["files"][image_id]  # original bytes, not re-encoded
    with pytest.raises(ValueError, match="expected 'vlpt-regions-v1'"):
        read_manifest(out)  # a pixel dataset is never read as region features


def test_regions_round_trip_keeps_most_confident_boxes(regions, tmp_path):
    out = tmp_path / "out"
    summary = build_region_shards(regions["features"], regions["captions"], out, samples_per_shard=4, **REGION_ARGS)
    assert summary["skipped"] == regions["skipped"] and summary["num_samples"] == 6
    _check_manifest(out, FORMAT, summary)
    m = read_manifest(out)
    assert (m.img_dim, m.label_dim) == (IMG_DIM, LABEL_DIM)
    with pytest.raises(ValueError, match="expected 'vlpt-pixels-v1'"):
        read_manifest(out, PIXEL_FORMAT)
    tok = load_tokenizer(DEMO_VOCAB_PATH)
    raws = [raw for p in m.shards for raw in iter_shard(p)]
    kept = {"normal": 6, "few": 3, "lowconf": 4, "many": 8, "1": 4}
    assert len(raws) == len(regions["good"])
    for raw, g in zip(raws, regions["good"]):
        sample, reason = decode_region_sample(raw, tok, 40, IMG_DIM, LABEL_DIM)
        assert reason is None and sample.image_id == str(g["image_id"])
        assert tok.decode(sample.input_ids.tolist()) == g["caption"]
        src = regions["arrays"][str(g["image_id"])]
        order = np.argsort(-src["conf"], kind="stable")[:kept[sample.image_id]]
        assert len(sample.img_feat) == len(order)
        np.testing.assert_array_equal(sample.img_feat, src["features"][order].astype(np.float32))
        np.testing.assert_array_equal(sample.img_pos[:, :6], src["norm_bb"][order])
        np.testing.assert_array_equal(sample.soft_labels, src["soft_labels"][order].astype(np.float32))
        with np.load(io.BytesIO(raw["npz"])) as z:
            assert z["features"].dtype == np.float16 and z["soft_labels"].dtype == np.float16
            np.testing.assert_array_equal(z["conf"], src["conf"][order])
            assert (np.diff(z["conf"]) <= 0).all()
    meta = [json.loads(r["json"]) for r in raws]
    assert meta[0]["caption_id"] == "normal-0" and meta[1]["caption_id"] == "normal-1"
    assert meta[-1] == {"image_id": "1", "caption": regions["good"][-1]["caption"], "caption_id": "x.1"}
    assert raws[-1]["__key__"] == "1-x_1"  # no dots in keys


def test_select_regions_rule():
    rng = np.random.default_rng(1)
    a = _regions(rng, np.array([0.1, 0.8, 0.3, 0.8, 0.95, 0.05]))
    pick = lambda **kw: select_regions(a, **kw)["conf"].tolist()  # noqa: E731
    assert pick(conf_th=0.5, min_bb=1, max_bb=10) == pytest.approx([0.95, 0.8, 0.8])
    assert pick(conf_th=0.5, min_bb=5, max_bb=10) == pytest.approx([0.95, 0.8, 0.8, 0.3, 0.1])
    assert pick(conf_th=0.5, min_bb=1, max_bb=2) == pytest.approx([0.95, 0.8])
    assert pick(conf_th=0.0, min_bb=10, max_bb=20) == pytest.approx([0.95, 0.8, 0.8, 0.3, 0.1, 0.05])
    ties = select_regions(a, conf_th=0.5, min_bb=1, max_bb=10)["features"]
    np.testing.assert_array_equal(ties[1:], a["features"][[1, 3]])  # equal conf: file order


def test_tsv_round_trip_and_image_ids(tsv, tmp_path):
    out = tmp_path / "out"
    assert main(["shards", "tsv", "--tsv", str(tsv["tsv"]), "--out", str(out), "--samples-per-shard", "2",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == tsv["skipped"]
    _check_manifest(out, PIXEL_FORMAT, {"num_samples": 2, "skipped": tsv["skipped"]})
    samples = _samples(out)
    assert len(samples) == 2  # a.jpg on two lines is one picture with two captions
    (k1, a, c1), (k2, _, c2), (k3, b, c3) = tsv["expected"]
    for s, (key, image_id, caps, ids) in zip(samples, [(k1, a, [c1, c2], [k1, k2]), (k3, b, [c3], [k3])]):
        assert s["__key__"] == key and s["jpg"] == tsv["files"][image_id]
        assert json.loads(s["json"]) == {"image_id": image_id, "captions": caps, "caption_ids": ids}


# ---------------------------------------------------------------- resume, atomicity, determinism

def test_rerun_skips_finished_shards_and_rebuilds_damaged_ones(coco, tmp_path, capsys):
    out = tmp_path / "out"
    first = build_coco_shards(coco["captions"], coco["images"], out, samples_per_shard=2)
    assert (first["num_shards"], first["built"]) == (3, 3)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    manifest = (out / "manifest.json").read_text()

    argv = ["shards", "coco", "--captions", str(coco["captions"]), "--images", str(coco["images"]),
            "--out", str(out), "--samples-per-shard", "2", "--no-progress"]
    assert main(argv) == 0
    assert "(0 built, 3 already done)" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")} == before
    assert (out / "manifest.json").read_text() == manifest  # skip counts survive via the sidecars

    (out / "shard-000000.tar").unlink()
    damaged = bytearray(before["shard-000002.tar"][1])
    damaged[600] ^= 0xFF  # same size, different content
    (out / "shard-000002.tar").write_bytes(bytes(damaged))
    again = build_coco_shards(coco["captions"], coco["images"], out, samples_per_shard=2)
    assert (again["built"], again["reused"]) == (2, 1)
    assert {n: b for n, b in _shard_bytes(out).items()} == {n: b for n, (_, b) in before.items()}
    assert (out / "shard-000001.tar").stat().st_mtime_ns == before["shard-000001.tar"][0]
    assert (out / "manifest.json").read_text() == manifest

    # A changed plan (other shard size) rebuilds everything.
    other = build_coco_shards(coco["captions"], coco["images"], out, samples_per_shard=4)
    assert (other["built"], other["num_shards"]) == (2, 2)
    assert verify_manifest(read_manifest(out, PIXEL_FORMAT)) == []


def test_interrupted_build_leaves_no_finished_looking_shard(tsv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = builders._pixel_samples

    def dies_midway(entries, skipped):
        for k, sample in enumerate(real(entries, skipped)):
            if k == 1:
                raise KeyboardInterrupt
            yield sample

    monkeypatch.setattr(builders, "_pixel_samples", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build_tsv_shards(tsv["tsv"], out, samples_per_shard=3)
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no temporary file, no sidecar, no manifest
    monkeypatch.setattr(builders, "_pixel_samples", real)
    summary = build_tsv_shards(tsv["tsv"], out, samples_per_shard=3)
    assert summary["built"] == 1 and (summary["num_samples"], summary["num_pairs"]) == (2, 3)


@pytest.mark.parametrize("kind", ["coco", "regions", "tsv"])
def test_builds_are_deterministic_for_any_worker_count(kind, coco, regions, tsv, tmp_path):
    inputs = {"coco": coco, "regions": regions, "tsv": tsv}[kind]
    per_shard = 1 if kind == "tsv" else 2  # tsv: 2 pictures
    a = _build(kind, inputs, tmp_path / "a", samples_per_shard=per_shard)
    b = _build(kind, inputs, tmp_path / "b", samples_per_shard=per_shard)
    c = _build(kind, inputs, tmp_path / "c", samples_per_shard=per_shard, workers=2, progress=True)
    assert a["num_shards"] >= 2 and c["built"] == a["num_shards"]
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b") == _shard_bytes(tmp_path / "c")
    assert a["skipped"] == b["skipped"] == c["skipped"]
    sha = [read_manifest(tmp_path / d, PIXEL_FORMAT if kind != "regions" else FORMAT).sha256 for d in "abc"]
    assert sha[0] == sha[1] == sha[2]


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("case, message", [
    ("coco-no-captions", "captions file not found"),
    ("coco-no-images", "image folder not found"),
    ("coco-not-coco", "is not COCO captions"),
    ("coco-spp0", "samples_per_shard must be an integer >= 1"),
    ("coco-workers0", "workers must be an integer >= 1"),
    ("regions-minmax", "min_bb (9) must not exceed max_bb (3)"),
    ("regions-no-features", "feature folder not found"),
    ("regions-bad-json", "is not readable JSON"),
    ("regions-nothing-usable", "no usable samples"),
    ("tsv-missing", "TSV file not found"),
    ("out-is-file", "is not a directory"),
])
def test_bad_arguments_are_one_line_errors(case, message, coco, regions, tsv, tmp_path, capsys):
    out = str(tmp_path / "out")
    c_args = ["--captions", str(coco["captions"]), "--images", str(coco["images"])]
    r_args = ["--features", str(regions["features"]), "--captions", str(regions["captions"])]
    (tmp_path / "list.json").write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "absent.json").write_text(json.dumps([{"image_id": "absent", "caption": "x"}]))
    (tmp_path / "afile").write_text("")
    argv = {
        "coco-no-captions": ["coco", "--captions", str(tmp_path / "nope.json"), "--images", str(coco["images"])],
        "coco-no-images": ["coco", "--captions", str(coco["captions"]), "--images", str(tmp_path / "nope")],
        "coco-not-coco": ["coco", "--captions", str(tmp_path / "list.json"), "--images", str(coco["images"])],
        "coco-spp0": ["coco", *c_args, "--samples-per-shard", "0"],
        "coco-workers0": ["coco", *c_args, "--workers", "0"],
        "regions-minmax": ["regions", *r_args, "--min-bb", "9", "--max-bb", "3"],
        "regions-no-features": ["regions", "--features", str(tmp_path / "nope"),
                                "--captions", str(regions["captions"])],
        "regions-bad-json": ["regions", "--features", str(regions["features"]),
                             "--captions", str(tmp_path / "broken.json")],
        "regions-nothing-usable": ["regions", "--features", str(regions["features"]), "--captions",
                                   str(tmp_path / "absent.json")],
        "tsv-missing": ["tsv", "--tsv", str(tmp_path / "nope.tsv")],
        "out-is-file": ["tsv", "--tsv", str(tsv["tsv"])],
    }[case]
    if case == "out-is-file":
        out = str(tmp_path / "afile")
    assert main(["shards", *argv, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlpt: error: ") and message in err and err.count("\n") == 1
    if case != "out-is-file":
        assert not Path(out).exists()
