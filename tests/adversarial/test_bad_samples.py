"""Bad sample contents: captions that do not encode, values finite on disk but not in the model,
boxes and soft labels out of their ranges. Each is skipped and counted by reason, never fatal."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import yaml

from data.collate import collate_mlm
from data.config import DataConfig
from data.demo_scenes import LABEL_DIM
from data.limits import DecodeLimits
from data.shards import decode_pixel_sample, decode_region_sample, iter_shard, write_manifest, write_shard
from data.tokenizer import load_tokenizer
from tests.adversarial.sample_attacks import (BAD_CAPTIONS, WHITESPACE_CAPTION, npz_header_bomb, pixel_raw, png_bomb,
                                              region_arrays, region_raw)
from tests.bad_input_data import IMG_DIM
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(REPO / "data/vocab/demo-vocab.txt")


def decode_regions(raw, tok, limits=DecodeLimits()):
    return decode_region_sample(raw, tok, 60, IMG_DIM, LABEL_DIM, limits=limits)


@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_caption_that_does_not_encode_is_a_bad_caption(tok, name):
    assert decode_regions(region_raw(caption=BAD_CAPTIONS[name]), tok) == (None, "bad_caption")
    assert decode_pixel_sample(pixel_raw(caption=BAD_CAPTIONS[name]), tok) == (None, "bad_caption")


def test_tabs_and_newlines_are_whitespace_not_bad(tok):
    sample, reason = decode_regions(region_raw(caption=WHITESPACE_CAPTION), tok)
    assert reason is None and tok.decode(sample.input_ids) == "a red cube left of a blue ball"
    sample, reason = decode_pixel_sample(pixel_raw(caption=WHITESPACE_CAPTION), tok)
    assert reason is None and sample.caption == WHITESPACE_CAPTION


@pytest.mark.parametrize("field", ["features", "norm_bb", "soft_labels"])
def test_values_beyond_float32_are_not_finite(tok, field):
    arrays = region_arrays()
    big = arrays[field].astype(np.float64)
    big[1, 2] = 1e39  # finite in float64, inf once decoded to float32
    assert decode_regions(region_raw(**{field: big}), tok) == (None, "nonfinite_features")


def test_fp16_runs_also_refuse_features_beyond_fp16(tok):
    feats = np.ones((3, IMG_DIM), np.float32)
    feats[0, 0] = 1e5
    raw = region_raw(features=feats)
    assert decode_regions(raw, tok, DataConfig().decode_limits("fp16")) == (None, "nonfinite_features")
    for dtype in ("fp32", "bf16"):
        sample, reason = decode_regions(raw, tok, DataConfig().decode_limits(dtype))
        assert reason is None and sample.img_feat[0, 0] == 1e5


@pytest.mark.parametrize("value, reason", [
    (1.5, "bad_boxes"), (-0.2, "bad_boxes"), (1.002, "bad_boxes"), (-0.002, "bad_boxes"),
    (1.0009, None), (-0.0009, None),  # within the 1e-3 tolerance
])
def test_boxes_must_lie_in_the_unit_square(tok, value, reason):
    for column in range(6):
        bb = region_arrays()["norm_bb"].copy()
        bb[2, column] = value
        assert decode_regions(region_raw(norm_bb=bb), tok)[1] == reason


def _soft(rows: np.ndarray) -> np.ndarray:
    return np.tile(rows, (3, 1)) if rows.ndim == 1 else rows


@pytest.mark.parametrize("soft, reason", [
    (np.r_[1.1, -0.1, np.zeros(LABEL_DIM - 2)], "bad_soft_labels"),
    (np.full(LABEL_DIM, 2.0 / LABEL_DIM), "bad_soft_labels"),
    (np.r_[0.9985, np.zeros(LABEL_DIM - 1)], "bad_soft_labels"),
    (np.r_[1.0009, np.zeros(LABEL_DIM - 1)], None),
    (np.r_[0.9991, np.zeros(LABEL_DIM - 1)], None),
])
def test_soft_labels_must_be_a_distribution(tok, soft, reason):
    assert decode_regions(region_raw(soft_labels=_soft(soft).astype(np.float32)), tok)[1] == reason


def test_fp16_softmax_over_1601_classes_passes(tok):
    """A detector's 1601-way softmax stored as fp16 sums to 1 within fp16 rounding (< 5e-4)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (50, 1601))
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft = (soft / soft.sum(1, keepdims=True)).astype(np.float16)
    raw = region_raw(soft_labels=soft, features=np.ones((50, IMG_DIM), np.float16),
                     norm_bb=np.full((50, 6), 0.5, np.float32), conf=np.ones(50, np.float32))
    assert decode_region_sample(raw, tok, 60, IMG_DIM, 1601)[1] is None


def test_a_batch_of_decoded_samples_has_only_finite_inputs(tok):
    """What passes decoding is finite where the model computes with it (w*h included)."""
    samples = [decode_regions(region_raw(f"k{i}"), tok)[0] for i in range(4)]
    batch = collate_mlm(samples, np.random.default_rng(0), tok=tok)
    assert all(np.isfinite(batch[k].numpy()).all() for k in ("img_feat", "img_pos_feat"))


def _tar_with_repeated_member(path, raw: dict, repeated: str) -> None:
    with tarfile.open(path, "w") as tar:
        for ext in [e for e in raw if not e.startswith("__")] + [repeated]:
            data = raw[ext] if ext != repeated or ext not in raw else raw[ext][::-1]
            info = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("modality", ["regions", "pixels"])
def test_a_sample_with_a_repeated_member_is_skipped_by_the_decoders(tok, tmp_path, modality):
    raw, ext = (region_raw(), "npz") if modality == "regions" else (pixel_raw(), "png")
    _tar_with_repeated_member(tmp_path / "s.tar", raw, ext)
    (read,) = list(iter_shard(tmp_path / "s.tar"))
    got = decode_regions(read, tok) if modality == "regions" else decode_pixel_sample(read, tok)
    assert got == (None, "duplicate_member")


# ---------------------------------------------------------------- a whole run

def _bad_region_samples() -> dict[str, list[dict]]:
    """Region samples of each new reason, keyed by the reason they must be counted under."""
    big_boxes = region_arrays()["norm_bb"].astype(np.float64)
    big_boxes[0, 0] = 1e39
    big_feats = region_arrays()["features"].astype(np.float64)
    big_feats[1, 1] = -1e39
    out_of_square = region_arrays()["norm_bb"].copy()
    out_of_square[1, 2] = 1.5
    negative = region_arrays()["soft_labels"].astype(np.float32)
    negative[0, :2] = (1.2, -0.2 + 1.0 / LABEL_DIM)
    return {
        "bad_caption": [region_raw("bad-surrogate", caption=BAD_CAPTIONS["lone_surrogate"]),
                        region_raw("bad-nul", caption=BAD_CAPTIONS["nul"])],
        "nonfinite_features": [region_raw("bad-boxes-1e39", norm_bb=big_boxes),
                               region_raw("bad-feats-1e39", features=big_feats)],
        "npz_too_large": [region_raw("bad-npz-bomb", npz=npz_header_bomb())],
        "bad_boxes": [region_raw("bad-boxes", norm_bb=out_of_square)],
        "bad_soft_labels": [region_raw("bad-soft", soft_labels=negative)],
    }


def _write_run_data(out, bad: list[dict], good: list[dict], manifest_meta: dict, fmt: str) -> None:
    """One shard: a bad sample before every second good one, so every batch keeps good ones."""
    mixed, bad = [], list(bad)
    for i, sample in enumerate(good):
        if bad and i % 2 == 1:
            mixed.append(bad.pop(0))
        mixed.append(sample)
    assert not bad
    split = out / "train"
    n = write_shard(split / "shard-000000.tar", mixed)
    write_manifest(split, [split / "shard-000000.tar"], manifest_meta, [n], fmt=fmt)


@pytest.mark.slow
def test_a_uniter_run_over_bad_contents_completes_and_counts_each_reason(tmp_path):
    from tests.bad_input_data import good_samples
    from tests.conftest import run_vlpt, write_tiny_config

    bad = _bad_region_samples()
    flat = [s for samples in bad.values() for s in samples]
    good = good_samples(40 - len(flat))
    _write_run_data(tmp_path / "data", flat, good, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, "vlpt-regions-v1")
    run_dir = tmp_path / "run"
    # 40 samples, batches of 8, one reader, no shuffling: 5 steps read each sample once.
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "data", run_dir, tasks={"mlm": 1, "itm": 0},
                            data={"val": None, "micro_batch_size": 8, "shuffle_buffer": 0},
                            train={"max_steps": 5, "log_every": 1})
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "vlpt pretrain: done" in proc.stdout and "Traceback" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_skipped"] == {reason: len(samples) for reason, samples in bad.items()}
    assert summary["data_seen"] == 40


@pytest.mark.slow
def test_an_albef_run_over_bad_pictures_completes_and_counts_each_reason(tmp_path):
    from data.demo_pixels import scene_samples
    from data.demo_scenes import generate_scenes
    from tests.conftest import run_vlpt, write_albef_config

    bad = {"bad_caption": [pixel_raw("bad-surrogate", caption=BAD_CAPTIONS["lone_surrogate"]),
                           pixel_raw("bad-c1", caption=BAD_CAPTIONS["c1_control"])],
           "image_too_large": [pixel_raw("bad-png-bomb", png=png_bomb(12000, 12000))]}
    flat = [s for samples in bad.values() for s in samples]
    good = [s for scene in generate_scenes("train", 20, seed=0, img_dim=IMG_DIM)
            for s in scene_samples(scene, image_size=32, fmt="vlpt-pixels-v1")][:32 - len(flat)]
    _write_run_data(tmp_path / "data", flat, good, {}, "vlpt-pixels-v1")  # the older layout is still read
    # 32 samples, one stream of 8: 4 steps read each sample once.
    cfg = write_albef_config(tmp_path, tmp_path / "data", "run", steps=4, optim={"global_batch_size": 8})
    sections = yaml.safe_load(cfg.read_text())
    sections["data"]["val"] = None  # (the helper's own `data` argument is the data directory)
    cfg.write_text(yaml.safe_dump(sections))
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "vlpt pretrain: done" in proc.stdout and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_skipped"] == {reason: len(samples) for reason, samples in bad.items()}
    assert summary["data_seen"] == 32
