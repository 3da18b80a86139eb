"""`vlpt shards ...` on hostile sources: the builders skip and count what the training reader
would skip (captions, values in the stored dtype, npz and picture bombs), never crash on it, and
never read a source file outside its declared root unless told to."""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data.builders import (BUILD_SKIP_REASONS, PLAN_SKIP_REASONS, build_coco_shards, build_region_shards,
                           build_tsv_shards)
from data.shards import FORMAT, PIXEL_FORMAT, decode_region_sample, iter_shard, read_manifest
from data.tokenizer import load_tokenizer
from tests.adversarial.sample_attacks import (BAD_CAPTIONS, GOOD_CAPTION, npz_deflate_bomb, npz_header_bomb, png_bomb,
                                              region_arrays, small_png)
from tests.bad_input_data import IMG_DIM
from tests.conftest import REPO
from vlpt.cli import main

REGION_ARGS = dict(conf_th=0.5, min_bb=1, max_bb=8)


def write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    """A COCO captions file; json.dumps escapes non-ASCII, so lone surrogates stay valid JSON."""
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_regions(folder: Path, arrays: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, a in arrays.items():
        np.savez(folder / f"{image_id}.npz", **a)


def build_regions(tmp_path: Path, arrays: dict[str, dict], captions: list[dict]) -> dict:
    write_regions(tmp_path / "feats", arrays)
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    return build_region_shards(tmp_path / "feats", tmp_path / "caps.json", tmp_path / "out", **REGION_ARGS)


def region_samples(out: Path) -> list[dict]:
    return [raw for p in read_manifest(out, FORMAT).shards for raw in iter_shard(p)]


def picture_ids(out: Path) -> list[str]:
    return [json.loads(raw["json"])["image_id"] for p in read_manifest(out, PIXEL_FORMAT).shards
            for raw in iter_shard(p)]


def test_new_reasons_are_listed():
    assert {"bad_caption", "bad_path", "path_outside_root"} <= set(PLAN_SKIP_REASONS)
    assert {"npz_too_large", "image_too_large"} <= set(BUILD_SKIP_REASONS)


# ---------------------------------------------------------------- values in the stored dtype

@pytest.mark.parametrize("value, reason", [(65504.0, None), (65520.0, "nonfinite_features"),
                                           (1e5, "nonfinite_features"), (-1e5, "nonfinite_features")])
def test_features_are_checked_as_the_fp16_the_shard_stores(tmp_path, value, reason):
    feats = np.ones((3, IMG_DIM), np.float32)
    feats[1, 2] = value  # finite in float32; 65520 and beyond round to inf in fp16
    captions = [{"image_id": "good", "caption": GOOD_CAPTION}, {"image_id": "big", "caption": GOOD_CAPTION}]
    summary = build_regions(tmp_path, {"good": region_arrays(), "big": region_arrays(features=feats)}, captions)
    assert summary["skipped"] == ({reason: 1} if reason else {})
    tok = load_tokenizer(REPO / "data/vocab/demo-vocab.txt")
    raws = region_samples(tmp_path / "out")
    assert len(raws) == (1 if reason else 2)
    assert all(decode_region_sample(raw, tok, 60, IMG_DIM)[1] is None for raw in raws)  # all usable in training


# ---------------------------------------------------------------- captions

@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_bad_captions_are_skipped_at_build_time(tmp_path, name):
    (tmp_path / "a.png").write_bytes(small_png())
    captions = write_coco(tmp_path, [{"id": 1, "file_name": "a.png"}],
                          [{"image_id": 1, "id": 1, "caption": GOOD_CAPTION},
                           {"image_id": 1, "id": 2, "caption": BAD_CAPTIONS[name]}])
    summary = build_coco_shards(captions, tmp_path, tmp_path / "out")
    assert summary["skipped"] == {"bad_caption": 1} and summary["num_samples"] == 1
    assert json.loads((tmp_path / "out/manifest.json").read_text())["skipped"] == {"bad_caption": 1}


@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_bad_captions_in_region_captions_are_skipped(tmp_path, name):
    summary = build_regions(tmp_path, {"good": region_arrays()},
                            [{"image_id": "good", "caption": GOOD_CAPTION},
                             {"image_id": "good", "caption": BAD_CAPTIONS[name]}])
    assert summary["skipped"] == {"bad_caption": 1} and summary["num_samples"] == 1


@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_bad_captions_in_a_tsv_are_skipped(tmp_path, name):
    (tmp_path / "a.png").write_bytes(small_png())
    tsv = tmp_path / "data.tsv"
    text = f"a.png\t{GOOD_CAPTION}\na.png\t{BAD_CAPTIONS[name]}\n"
    tsv.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    summary = build_tsv_shards(tsv, tmp_path / "out")
    # A lone surrogate written to a file is no UTF-8: that line is unreadable, not a caption.
    expected = {"bad_line": 1} if name == "lone_surrogate" else {"bad_caption": 1}
    assert summary["skipped"] == expected and summary["num_samples"] == 1


def test_ids_and_file_names_that_are_not_text_are_counted_not_raised(tmp_path):
    (tmp_path / "a.png").write_bytes(small_png())
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b\x00.png"},
              {"id": 3, "file_name": "c\ud800.png"}]
    anns = [{"image_id": 1, "id": 1, "caption": GOOD_CAPTION}, {"image_id": 1, "id": "x\ud800", "caption": "two"},
            {"image_id": "y\udfff", "id": 3, "caption": "three"}, {"image_id": 2, "id": 4, "caption": "four"},
            {"image_id": 3, "id": 5, "caption": "five"}]
    summary = build_coco_shards(write_coco(tmp_path, images, anns), tmp_path, tmp_path / "out")
    assert summary["skipped"] == {"bad_caption_entry": 2, "bad_path": 2} and summary["num_samples"] == 1


# ---------------------------------------------------------------- bombs

def test_npz_bombs_are_skipped_without_reading_them(tmp_path):
    feats = tmp_path / "feats"
    write_regions(feats, {"good": region_arrays()})
    (feats / "deflate.npz").write_bytes(npz_deflate_bomb(300 << 20))  # inflates past the 256 MiB budget
    (feats / "header.npz").write_bytes(npz_header_bomb())  # declares 2 GiB
    # Bombs first: the width of the features is inferred from the first npz that reads.
    caps = [{"image_id": i, "caption": GOOD_CAPTION} for i in ("deflate", "header", "good")]
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    tracemalloc.start()
    try:
        summary = build_region_shards(feats, tmp_path / "caps.json", tmp_path / "out", **REGION_ARGS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["skipped"] == {"npz_too_large": 2} and summary["num_samples"] == 1
    assert peak < 32 << 20, f"building read {peak} bytes at once"


def test_picture_bomb_source_is_skipped_from_its_header(tmp_path):
    (tmp_path / "ok.png").write_bytes(small_png())
    (tmp_path / "bomb.png").write_bytes(png_bomb(12000, 12000))
    captions = write_coco(tmp_path, [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": "bomb.png"}],
                          [{"image_id": 1, "id": 1, "caption": GOOD_CAPTION},
                           {"image_id": 2, "id": 2, "caption": GOOD_CAPTION}])
    summary = build_coco_shards(captions, tmp_path, tmp_path / "out")
    assert summary["skipped"] == {"image_too_large": 1} and picture_ids(tmp_path / "out") == ["1"]


def test_picture_budget_of_the_builder_is_exact(tmp_path):
    (tmp_path / "a.png").write_bytes(small_png(side=32))
    tsv = tmp_path / "data.tsv"
    tsv.write_text(f"a.png\t{GOOD_CAPTION}\n")
    tight = build_tsv_shards(tsv, tmp_path / "tight", max_image_pixels=32 * 32 - 1)
    assert (tight["num_samples"], tight["skipped"]) == (0, {"image_too_large": 1})
    fits = build_tsv_shards(tsv, tmp_path / "fits", max_image_pixels=32 * 32)
    assert (fits["num_samples"], fits["skipped"]) == (1, {})
    with pytest.raises(ValueError, match="max_image_pixels must be an integer >= 1"):
        build_tsv_shards(tsv, tmp_path / "zero", max_image_pixels=0)


# ---------------------------------------------------------------- paths leaving the root

def _outside_sources(run: Path, secret: Path) -> list[str]:
    """Names that lead from `run/images` to `secret`: `..`, absolute, and a symlink inside."""
    images = run / "images"
    images.mkdir(parents=True)
    (images / "ok.png").write_bytes(small_png())
    (images / "link.png").symlink_to(secret)
    return [os.path.relpath(secret, images), str(secret), "link.png"]


def test_coco_file_names_outside_the_image_root_are_refused(outside_guard, tmp_path):
    _, run = outside_guard
    secret = tmp_path / "secret.png"
    secret.write_bytes(small_png(colour=(1, 2, 3)))
    names = ["ok.png", *_outside_sources(run, secret), "/etc/passwd"]
    captions = write_coco(run, [{"id": i, "file_name": n} for i, n in enumerate(names)],
                          [{"image_id": i, "id": i, "caption": GOOD_CAPTION} for i in range(len(names))])
    summary = build_coco_shards(captions, run / "images", run / "out")
    assert summary["skipped"] == {"path_outside_root": 4} and picture_ids(run / "out") == ["0"]
    allowed = build_coco_shards(captions, run / "images", run / "allowed", allow_outside_root=True)
    assert allowed["skipped"] == {"unsupported_image_type": 1}  # /etc/passwd, when allowed, is no picture
    assert picture_ids(run / "allowed") == ["0", "1", "2", "3"]


def test_tsv_paths_outside_its_folder_are_refused(outside_guard, tmp_path):
    _, run = outside_guard
    secret = tmp_path / "secret.png"
    secret.write_bytes(small_png(colour=(1, 2, 3)))
    names = ["ok.png", *_outside_sources(run, secret)]
    tsv = run / "images" / "data.tsv"
    tsv.write_text("".join(f"{n}\t{GOOD_CAPTION}\n" for n in names))
    summary = build_tsv_shards(tsv, run / "out")
    assert summary["skipped"] == {"path_outside_root": 3} and summary["num_samples"] == 1
    assert build_tsv_shards(tsv, run / "allowed", allow_outside_root=True)["num_samples"] == 4


def test_region_image_ids_outside_the_feature_folder_are_refused(outside_guard, tmp_path):
    _, run = outside_guard
    write_regions(tmp_path, {"secret": region_arrays()})
    write_regions(run / "feats", {"good": region_arrays()})
    caps = [{"image_id": "good", "caption": GOOD_CAPTION},
            {"image_id": os.path.relpath(tmp_path / "secret", run / "feats"), "caption": GOOD_CAPTION},
            {"image_id": str(tmp_path / "secret"), "caption": GOOD_CAPTION},
            {"image_id": "a\x00b", "caption": GOOD_CAPTION}]  # an id that is no text: a bad entry
    (run / "caps.json").write_text(json.dumps(caps))
    summary = build_region_shards(run / "feats", run / "caps.json", run / "out", **REGION_ARGS)
    assert summary["skipped"] == {"path_outside_root": 2, "bad_caption_entry": 1} and summary["num_samples"] == 1


def test_cli_names_the_skips_and_takes_the_outside_flag(outside_guard, tmp_path, capsys):
    _, run = outside_guard
    secret = tmp_path / "secret.png"
    secret.write_bytes(small_png())
    names = ["ok.png", str(secret)]
    (run / "images").mkdir(parents=True)
    (run / "images" / "ok.png").write_bytes(small_png())
    captions = write_coco(run, [{"id": i, "file_name": n} for i, n in enumerate(names)],
                          [{"image_id": 0, "id": 0, "caption": GOOD_CAPTION},
                           {"image_id": 0, "id": 1, "caption": BAD_CAPTIONS["lone_surrogate"]},
                           {"image_id": 1, "id": 2, "caption": GOOD_CAPTION}])
    argv = ["shards", "coco", "--captions", str(captions), "--images", str(run / "images"), "--no-progress"]
    assert main([*argv, "--out", str(run / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped: bad_caption=1, path_outside_root=1\n" in out and "pass --allow-outside-root" in out
    assert main([*argv, "--out", str(run / "allowed"), "--allow-outside-root"]) == 0
    out = capsys.readouterr().out
    assert "skipped: bad_caption=1\n" in out and "--allow-outside-root" not in out
