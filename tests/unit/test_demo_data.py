"""Demo dataset, shard format, manifest and demo vocabulary."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from data.demo import write_demo_dataset
from data.demo_scenes import (
    DEMO_COLOURS, DEMO_SHAPES, LABEL_DIM, SHAPE_ASPECT, all_demo_captions, demo_prototypes, generate_scenes, stuff_band,
)
from data.shards import FORMAT, file_sha256, iter_shard, read_manifest, verify_manifest
from data.tokenizer import Tokenizer, load_tokenizer
from data.vocab import DEMO_VOCAB_PATH, build_demo_vocab

SMALL = dict(seed=3, n_train_scenes=40, n_val_scenes=12, img_dim=32, scenes_per_shard=15)
PHRASE = re.compile(r"\b(an?) (" + "|".join(DEMO_COLOURS) + r") (" + "|".join(DEMO_SHAPES) + r")\b")


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("demo_a"), tmp_path_factory.mktemp("demo_b")
    return write_demo_dataset(a, **SMALL), write_demo_dataset(b, **SMALL), a, b


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _npz(raw: dict) -> dict:
    with np.load(io.BytesIO(raw["npz"])) as z:
        return {k: z[k] for k in z.files}


def _samples(split_dir) -> list[dict]:
    return [raw for path in read_manifest(split_dir).shards for raw in iter_shard(path)]


# ------------------------------------------------------------ dataset files

def test_same_seed_gives_identical_shards(demo_dirs):
    _, _, a, b = demo_dirs
    for split in ("train", "val"):
        ma, mb = read_manifest(a / split), read_manifest(b / split)
        assert ma.sha256 == mb.sha256
        assert [file_sha256(p) for p in ma.shards] == [file_sha256(p) for p in mb.shards]


def test_other_seed_gives_other_shards(tmp_path, demo_dirs):
    write_demo_dataset(tmp_path, **{**SMALL, "seed": 4})
    assert read_manifest(tmp_path / "val").sha256 != read_manifest(demo_dirs[2] / "val").sha256


def test_manifest_counts_bytes_and_checksums(demo_dirs):
    summary, _, a, _ = demo_dirs
    for split, n_scenes in (("train", 40), ("val", 12)):
        m = read_manifest(a / split)
        raw = json.loads((a / split / "manifest.json").read_text())
        assert raw["format"] == FORMAT and (m.img_dim, m.label_dim) == (32, LABEL_DIM)
        assert len(m.shards) == -(-n_scenes // 15)
        assert [p.rsplit("/", 1)[1] for p in m.shards] == [f"shard-{i:06d}.tar" for i in range(len(m.shards))]
        assert m.counts == [sum(1 for _ in iter_shard(p)) for p in m.shards]
        assert m.num_samples == raw["num_samples"] == 2 * n_scenes == summary[split]["samples"]
        assert [s["bytes"] for s in raw["shards"]] == [(a / split / s["path"]).stat().st_size for s in raw["shards"]]
        assert verify_manifest(m) == []
    assert summary["num_samples"] == 2 * (40 + 12)


def test_sample_schema(demo_dirs):
    for raw in _samples(demo_dirs[2] / "train"):
        meta = json.loads(raw["json"])
        assert set(meta) == {"image_id", "caption", "caption_id"} and meta["caption_id"] == raw["__key__"]
        z = _npz(raw)
        n = len(z["features"])
        assert 5 <= n <= 11  # 2-4 objects proposed twice + 1-3 background regions
        assert z["features"].dtype == np.float16 and z["features"].shape == (n, 32)
        assert z["norm_bb"].dtype == np.float32 and z["norm_bb"].shape == (n, 6)
        assert z["conf"].dtype == np.float32 and z["conf"].shape == (n,)
        assert z["soft_labels"].dtype == np.float16 and z["soft_labels"].shape == (n, LABEL_DIM)
        bb = z["norm_bb"]
        assert (bb[:, :4] >= 0).all() and (bb[:, :4] <= 1).all()
        np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=1e-6)
        np.testing.assert_allclose(z["soft_labels"].astype(np.float32).sum(1), 1.0, atol=5e-3)


def test_two_captions_per_scene_share_image_id(demo_dirs):
    by_image: dict[str, list[str]] = {}
    for raw in _samples(demo_dirs[2] / "train"):
        meta = json.loads(raw["json"])
        by_image.setdefault(meta["image_id"], []).append(meta["caption"])
    assert len(by_image) == 40
    assert all(len(c) == 2 and c[0] != c[1] for c in by_image.values())


def test_val_scenes_differ_from_train(demo_dirs):
    a = demo_dirs[2]
    boxes = {split: {_npz(r)["norm_bb"].tobytes() for r in _samples(a / split)} for split in ("train", "val")}
    ids = {split: {json.loads(r["json"])["image_id"] for r in _samples(a / split)} for split in ("train", "val")}
    assert not boxes["train"] & boxes["val"]
    assert not ids["train"] & ids["val"]


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    """Independent re-derivation of the caption relation from two norm_bb rows."""
    ax, ay = (float(a[0]) + float(a[2])) / 2, (float(a[1]) + float(a[3])) / 2
    bx, by = (float(b[0]) + float(b[2])) / 2, (float(b[1]) + float(b[3])) / 2
    if max(abs(ax - bx), abs(ay - by)) < 0.15:
        return "next to"
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"  # y grows downwards


def test_captions_true_to_boxes(demo_dirs):
    scenes = {s.image_id: s for s in generate_scenes("train", 40, seed=3, img_dim=32)}
    checked = 0
    for raw in _samples(demo_dirs[2] / "train"):
        meta, z = json.loads(raw["json"]), _npz(raw)
        scene = scenes[meta["image_id"]]
        np.testing.assert_array_equal(scene.norm_bb, z["norm_bb"])
        phrases = PHRASE.findall(meta["caption"])
        assert len(phrases) == 2, meta["caption"]
        rows = []
        for article, colour, shape in phrases:
            assert article == ("an" if colour[0] in "aeiou" else "a")
            obj = (DEMO_SHAPES.index(shape), DEMO_COLOURS.index(colour))
            twins = [i for i, o in enumerate(scene.objects) if o == obj]
            assert len(twins) == 2
            rows.append(max(twins, key=lambda i: scene.conf[i]))  # captions use the surer box
        if meta["caption"].startswith("there is"):
            continue
        relation = _relation(z["norm_bb"][rows[0]], z["norm_bb"][rows[1]])
        assert f" {relation} " in meta["caption"], (meta["caption"], relation)
        checked += 1
    assert checked >= 40  # most captions carry a relation


def test_objects_and_clutter_regions(demo_dirs):
    scenes = generate_scenes("val", 12, seed=3, img_dim=32)
    for scene in scenes:
        soft = scene.soft_labels.astype(np.float32)
        for i, obj in enumerate(scene.objects):
            if obj is None:
                assert 0.05 <= scene.conf[i] <= 0.3 and soft[i].argmax() == 0
            else:
                assert 0.3 <= scene.conf[i] <= 1.0 and soft[i].argmax() == 1 + obj[0]
        objects = [o for o in scene.objects if o is not None]
        n_obj = len(set(objects))  # distinct (shape, colour)
        assert 2 <= n_obj <= 4 and 1 <= len(scene.objects) - len(objects) <= 3
        for obj in set(objects):  # each object proposed twice: a sure box and an overlapping twin
            i, j = sorted((k for k, o in enumerate(scene.objects) if o == obj), key=lambda k: -scene.conf[k])
            assert 0.6 <= scene.conf[i] <= 1.0 and 0.3 <= scene.conf[j] <= 0.6
            assert _iou(scene.norm_bb[i], scene.norm_bb[j]) > 0.25


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_context_predicts_a_hidden_region():
    """What masked region modelling can learn: a shape from its box's aspect ratio (the
    surer proposal's aspect is nearest its shape's typical one), background from its height."""
    p_shape, p_colour, p_stuff = demo_prototypes(0, 64)
    shape_hits = shapes = stuff_hits = stuff = 0
    for scene in generate_scenes("train", 150, seed=0, img_dim=64):
        bb = scene.norm_bb
        bands = stuff_band(bb)
        for i, obj in enumerate(scene.objects):
            if obj is None:
                f = scene.features[i].astype(np.float64)
                stuff_hits += int(((p_stuff * np.sqrt(2.0) - f) ** 2).sum(1).argmin()) == bands[i]
                stuff += 1
            elif scene.conf[i] >= 0.6:
                aspect = bb[i, 4] / bb[i, 5]
                shape_hits += int(np.abs(np.log(SHAPE_ASPECT) - np.log(aspect)).argmin()) == obj[0]
                shapes += 1
    assert stuff_hits == stuff > 100
    assert shape_hits / shapes > 0.7 and shapes > 300


def test_features_are_learnable():
    """A nearest-prototype readout recovers (shape, colour) from nearly every object region."""
    p_shape, p_colour, _ = demo_prototypes(0, 64)
    centres = (p_shape[:, None] + p_colour[None]).reshape(-1, 64)  # [64, D]
    hits = total = 0
    for scene in generate_scenes("train", 150, seed=0, img_dim=64):
        for obj, f in zip(scene.objects, scene.features.astype(np.float64)):
            if obj is not None:
                best = int(((centres - f) ** 2).sum(1).argmin())
                hits += best == obj[0] * len(DEMO_COLOURS) + obj[1]
                total += 1
    assert hits / total > 0.95


def test_default_size_summary(tmp_path):
    summary = write_demo_dataset(tmp_path)
    assert (summary["train"]["samples"], summary["val"]["samples"]) == (4000, 500)
    assert (summary["train"]["shards"], summary["val"]["shards"]) == (8, 1)
    assert summary["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*/shard-*.tar"))


# ------------------------------------------------------------ manifest errors

def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_manifest(tmp_path)


# ------------------------------------------------------------ vocabulary / tokenizer

def test_shipped_vocab_equals_fresh_build(tmp_path):
    build_demo_vocab(tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_bytes() == DEMO_VOCAB_PATH.read_bytes()


def test_vocab_layout(tok):
    lines = DEMO_VOCAB_PATH.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.first_random_id == 5 and lines[5] == "!"
    assert tok.vocab_size == len(lines) == len(set(lines))


def test_every_caption_word_is_one_word_piece(tok):
    words = {w for caption in all_demo_captions() for w in caption.split()}
    for w in words:
        assert tok.tokenize(w) == [w]
    caption = "an orange cylinder is left of a red ball"
    assert len(tok.encode(caption)) == 9 and tok.decode(tok.encode(caption)) == caption


def test_any_ascii_text_tokenizes_without_unk(tok):
    text = "Hello, World! x9 Zq_QUUX 42 ~{}[]#@ " + "".join(chr(c) for c in range(33, 127))
    ids = tok.encode(text)
    assert tok.unk_id not in ids and all(tok.first_random_id <= i < tok.vocab_size for i in ids)


def test_tokenizer_errors_and_cache(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=str(missing)):
        Tokenizer(missing)
    no_bang = tmp_path / "v.txt"
    no_bang.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    with pytest.raises(ValueError, match="'!'"):
        _ = Tokenizer(no_bang).first_random_id
    assert load_tokenizer(DEMO_VOCAB_PATH) is load_tokenizer(str(DEMO_VOCAB_PATH))
