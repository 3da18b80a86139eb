"""Decompression bombs: a picture or npz that is small on disk but huge once decoded is skipped
from its header, before it is decoded, and counted by reason; memory stays flat."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.limits import DecodeLimits
from data.shards import (PIXEL_SKIP_REASONS, SKIP_REASONS, decode_pixel_sample, decode_region_sample,
                         encode_npz, write_shard)
from data.tokenizer import load_tokenizer
from tests.adversarial.sample_attacks import (npz_deflate_bomb, npz_header_bomb, pixel_raw, png_bomb, region_arrays,
                                              region_raw, small_png)
from tests.bad_input_data import IMG_DIM
from tests.conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(REPO / "data/vocab/demo-vocab.txt")


@pytest.fixture(scope="module")
def bombs():
    """The issue's bombs: a 12000x12000 PNG (~150 KB), a 1 GiB deflated npz member (~1 MB)
    and an npz whose .npy header declares 2 GiB."""
    out = {"png": png_bomb(12000, 12000), "deflate": npz_deflate_bomb(1 << 30), "header": npz_header_bomb()}
    assert all(len(b) < 2 << 20 for b in out.values()), {k: len(b) for k, b in out.items()}
    return out


def decode_regions(raw, tok, limits=DecodeLimits()):
    return decode_region_sample(raw, tok, 60, IMG_DIM, limits=limits)


def test_new_reasons_are_listed():
    assert {"image_too_large", "bad_caption"} <= set(PIXEL_SKIP_REASONS)
    assert {"npz_too_large", "bad_caption", "bad_boxes", "bad_soft_labels"} <= set(SKIP_REASONS)


def test_png_bomb_is_skipped_from_its_header(tok, bombs):
    assert decode_pixel_sample(pixel_raw(png=bombs["png"]), tok) == (None, "image_too_large")


def test_picture_budget_is_exact(tok):
    png = small_png(side=32)
    assert decode_pixel_sample(pixel_raw(png=png), tok, DecodeLimits(max_image_pixels=32 * 32 - 1)) == \
        (None, "image_too_large")
    sample, reason = decode_pixel_sample(pixel_raw(png=png), tok, DecodeLimits(max_image_pixels=32 * 32))
    assert reason is None and sample.image.size == (32, 32)


def test_pil_bomb_error_counts_as_too_large_whatever_its_global_setting(tok, monkeypatch):
    # Another library may lower PIL's process-wide limit; its error is a skip, not a crash.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_pixel_sample(pixel_raw(png=small_png(side=32)), tok) == (None, "image_too_large")


def test_webp_members_decode(tok):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="WEBP")
    raw = pixel_raw()
    del raw["png"]
    sample, reason = decode_pixel_sample({**raw, "webp": buf.getvalue()}, tok)
    assert reason is None and sample.image.size == (8, 8)


def test_formats_other_than_jpeg_png_webp_are_bad_images(tok):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="TIFF")
    assert decode_pixel_sample(pixel_raw(png=buf.getvalue()), tok) == (None, "bad_image")


@pytest.mark.parametrize("kind", ["deflate", "header"])
def test_npz_bomb_is_skipped_before_reading(tok, bombs, kind):
    assert decode_regions(region_raw(npz=bombs[kind]), tok) == (None, "npz_too_large")


def test_npz_budget_counts_all_arrays_and_is_exact(tok):
    arrays = region_arrays()
    total = sum(a.nbytes for a in arrays.values())
    raw = region_raw(npz=encode_npz(arrays))
    assert decode_regions(raw, tok, DecodeLimits(max_member_bytes=total - 1)) == (None, "npz_too_large")
    sample, reason = decode_regions(raw, tok, DecodeLimits(max_member_bytes=total))
    assert reason is None and sample.img_feat.shape == (3, IMG_DIM)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_npz_members_compressed_without_an_output_bound_are_bad(tok, method):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for k, a in region_arrays().items():
            with z.open(f"{k}.npy", "w") as f:
                np.save(f, a, allow_pickle=False)
    assert decode_regions(region_raw(npz=buf.getvalue()), tok) == (None, "bad_npz")


def test_npz_whose_header_disagrees_with_its_data_is_bad(tok):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, a in region_arrays().items():
            f = io.BytesIO()
            np.save(f, a, allow_pickle=False)
            z.writestr(f"{k}.npy", f.getvalue()[:-2] if k == "features" else f.getvalue())
    assert decode_regions(region_raw(npz=buf.getvalue()), tok) == (None, "bad_npz")


def test_npz_whose_header_declares_a_negative_shape_is_bad(tok):
    assert decode_regions(region_raw(npz=npz_header_bomb(rows=-(1 << 26))), tok) == (None, "bad_npz")


def test_empty_widths_are_skipped_not_raised(tok):
    raw = region_raw(features=np.ones((3, 0), np.float16), soft_labels=np.ones((3, 0), np.float16))
    assert decode_region_sample(raw, tok, 60) == (None, "bad_soft_labels")


@pytest.mark.parametrize("field, value", [("max_image_pixels", 0), ("max_member_bytes", -1)])
def test_budgets_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


def _peak_rss(tmp_path, name: str, pictures: list[dict], regions: list[dict]) -> dict:
    write_shard(tmp_path / f"{name}-pixels.tar", pictures)
    write_shard(tmp_path / f"{name}-regions.tar", regions)
    proc = subprocess.run([sys.executable, "-m", "tests.adversarial.decode_batch_rss",
                           str(tmp_path / f"{name}-pixels.tar"), str(tmp_path / f"{name}-regions.tar")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bombs_keep_the_peak_memory_of_a_micro_batch_flat(tmp_path, bombs):
    pictures = [pixel_raw(f"p{i}") for i in range(8)]
    regions = [region_raw(f"r{i}") for i in range(8)]
    clean = _peak_rss(tmp_path, "clean", pictures, regions)
    assert clean["skipped"] == {} and clean["pictures"] == clean["regions"] == 8
    pictures[1], pictures[5] = pixel_raw("p1", png=bombs["png"]), pixel_raw("p5", png=bombs["png"])
    regions[2], regions[6] = region_raw("r2", npz=bombs["deflate"]), region_raw("r6", npz=bombs["header"])
    bombed = _peak_rss(tmp_path, "bombed", pictures, regions)
    assert bombed["skipped"] == {"image_too_large": 2, "npz_too_large": 2}
    assert bombed["pictures"] == bombed["regions"] == 6
    print(f"peak RSS of a micro-batch of 8: clean {clean['peak_rss_kb']} KB, with bombs {bombed['peak_rss_kb']} KB "
          f"(x{bombed['peak_rss_kb'] / clean['peak_rss_kb']:.2f}); skipped {bombed['skipped']}")
    assert bombed["peak_rss_kb"] <= 1.5 * clean["peak_rss_kb"], (bombed, clean)
