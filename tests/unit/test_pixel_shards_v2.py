"""Picture shards that store each picture once (vlpt-pixels-v2): the readers expand a picture's
captions into (picture, caption) pairs with the epochs, batches and resume positions of the
one-sample-per-caption layout (vlpt-pixels-v1), which is still read."""
from __future__ import annotations

import functools
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import data.pixels
from data.builders import Entry, _pictures
from data.collate_albef import collate_albef
from data.demo_pixels import write_demo_pixels
from data.limits import DEFAULT_MAX_CAPTIONS
from data.loader import ResumableTaskLoader, StreamSpec, TaskBatches
from data.pixels import PixelConfig
from data.shards import PIXEL_FORMAT, PIXEL_FORMAT_V1, read_manifest, write_manifest, write_shard
from data.sources import DatasetShards
from tests.loader_util import tokenizer

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
SHAPES = ("cube", "ball", "cone", "cylinder", "ring", "star", "pyramid", "disk")
CAPTIONS = (1, 3, 2, 4, 1, 2, 5, 1, 2, 3, 1, 4, 2, 2, 1, 3, 2, 1, 4, 2)
"""Captions of each picture of the hand-made shards (46 pairs of 20 pictures)."""


def png(i: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def pictures(counts=CAPTIONS, prefix: str = "") -> list[dict]:
    """One v2 sample per picture, `counts[i]` captions for picture i."""
    out = []
    for i, n in enumerate(counts):
        caps = [f"a {COLOURS[(i + k) % 8]} {SHAPES[k % 8]}" for k in range(n)]
        ids = [f"{prefix}c{i}-{k}" for k in range(n)]
        out.append({"__key__": f"{prefix}pic-{i:04d}", "png": png(i),
                    "json": {"image_id": f"{prefix}img-{i}", "captions": caps, "caption_ids": ids}})
    return out


def as_v1(sample: dict) -> list[dict]:
    """The same picture as one sample per caption (vlpt-pixels-v1)."""
    meta = sample["json"]
    return [{"__key__": cid, "png": sample["png"], "json": {"image_id": meta["image_id"], "caption": c,
                                                              "caption_id": cid}}
            for c, cid in zip(meta["captions"], meta["caption_ids"])]


def write_pictures(directory: Path, samples: list[dict], per_shard: int, fmt: str = PIXEL_FORMAT) -> Path:
    """`per_shard` pictures a shard, in the v2 layout or (fmt v1) their captions one sample each."""
    paths, counts = [], []
    for i in range(0, len(samples), per_shard):
        chunk = samples[i:i + per_shard]
        rows = chunk if fmt == PIXEL_FORMAT else [s for p in chunk for s in as_v1(p)]
        paths.append(directory / f"shard-{len(paths):06d}.tar")
        counts.append(write_shard(paths[-1], rows))
    write_manifest(directory, paths, {}, counts, fmt=fmt)
    return directory


def spec_of(directory: Path, **kw) -> StreamSpec:
    ds = DatasetShards.from_manifest("train", read_manifest(directory, PIXEL_FORMAT))
    base = dict(task="albef", seed=5, n_streams=2, batch_size=3, shuffle_buffer=7, max_txt_len=20, img_dim=0,
                modality="pixels")
    return StreamSpec(datasets=(ds,), **{**base, **kw})


def pair_collate(samples, rng) -> dict:
    """The pairs of a batch: (picture hash, caption, key)."""
    return {"pairs": [(hashlib.sha256(s.image.tobytes()).hexdigest()[:16], s.caption, s.key) for s in samples]}


def loader(spec: StreamSpec, state=None, collate=pair_collate, streams=(0, 1)) -> ResumableTaskLoader:
    return ResumableTaskLoader(TaskBatches(spec, tokenizer(), collate, list(streams), state), 0)


def one_epoch(spec: StreamSpec) -> list[list[tuple]]:
    """Every batch of every stream in step order (TaskBatches itself: it serves all `parts` readers)."""
    batches = TaskBatches(spec, tokenizer(), pair_collate, list(range(spec.n_streams)))
    return [b["pairs"] for b in batches if not b.get("counts_only")]


# ---------------------------------------------------------------- size and the epoch's pairs

def test_demo_pictures_are_stored_once_and_the_epoch_holds_the_same_pairs(tmp_path, capsys):
    small = dict(seed=0, n_train_scenes=48, n_val_scenes=10, scenes_per_shard=12, image_size=32)  # = pixel_data
    v1 = write_demo_pixels(tmp_path / "v1", fmt=PIXEL_FORMAT_V1, **small)
    v2 = write_demo_pixels(tmp_path / "v2", **small)
    with capsys.disabled():
        print(f"\ndemo pictures (32 px, 58 scenes, 2 captions each): v1 {v1['bytes']} bytes, v2 {v2['bytes']} bytes "
              f"({v1['bytes'] / v2['bytes']:.2f}x)")
    assert v2["bytes"] < v1["bytes"] and v2["num_pairs"] == v1["num_pairs"] == v1["num_samples"] == 116
    assert v2["num_samples"] == 58
    for kw in ({}, {"shuffle_buffer": 0}, {"n_streams": 3, "parts": 2, "batch_size": 4, "shuffle_buffer": 16}):
        a = one_epoch(spec_of(tmp_path / "v1" / "train", epochs=1, **kw))
        b = one_epoch(spec_of(tmp_path / "v2" / "train", epochs=1, **kw))
        pairs = Counter(p[:2] for batch in b for p in batch)
        assert sum(pairs.values()) == 96 and Counter(p[:2] for batch in a for p in batch) == pairs  # the multiset
        assert a == b  # and, as a scene's captions were consecutive in v1, the very same batches in order


def test_an_epoch_is_every_pair_once_with_equal_batch_counts(tmp_path):
    data = write_pictures(tmp_path, pictures(), per_shard=6)
    assert read_manifest(data, PIXEL_FORMAT).pairs == [13, 16, 11, 6]
    for n_streams, parts in ((1, 1), (2, 1), (3, 2)):
        spec = spec_of(data, n_streams=n_streams, parts=parts, epochs=1)
        readers = Counter()
        keys = Counter()
        for batch in TaskBatches(spec, tokenizer(), pair_collate, list(range(n_streams))):
            readers[batch["reader"]] += 1
            keys.update(p[2] for p in batch["pairs"])
        assert len(keys) == sum(CAPTIONS) and set(keys.values()) == {1}
        assert len(set(readers.values())) == 1 and len(readers) == n_streams * parts


def test_v1_and_v2_of_the_same_pictures_give_the_same_batches(tmp_path):
    samples = pictures()
    v1 = write_pictures(tmp_path / "v1", samples, per_shard=6, fmt=PIXEL_FORMAT_V1)
    v2 = write_pictures(tmp_path / "v2", samples, per_shard=6)
    assert v2.joinpath("shard-000000.tar").stat().st_size < v1.joinpath("shard-000000.tar").stat().st_size
    assert one_epoch(spec_of(v1, epochs=2)) == one_epoch(spec_of(v2, epochs=2))


# ---------------------------------------------------------------- exact resume

def test_resume_inside_a_pictures_captions_replays_exactly(tmp_path):
    data = write_pictures(tmp_path, pictures(), per_shard=6)
    spec = spec_of(data)  # blocks of 6 pairs cut pictures of up to 5 captions apart
    collate = functools.partial(collate_albef, tok=tokenizer(), pixels=PixelConfig(image_size=16), max_txt_len=20)

    def fingerprint(batch):
        return tuple(batch["keys"]), batch["pixels"].numpy().tobytes(), batch["mlm_input_ids"].numpy().tobytes()

    whole = loader(spec, collate=collate)
    steps, states = [], [whole.state_dict()]
    for _ in range(20):  # 40 batches of 3: past the first epoch (46 pairs over 2 readers)
        steps.append((fingerprint(whole.next()), fingerprint(whole.next())))
        states.append(json.loads(json.dumps(whole.state_dict())))  # as a checkpoint stores it
    inside = [k for k, s in enumerate(states) if any("base" in p["source"] for p in s["readers"].values())]
    assert inside  # some positions point into a picture's captions
    for k in sorted({*inside[:3], 1, 7, 9, 16}):
        resumed = loader(spec, states[k], collate)
        assert [(fingerprint(resumed.next()), fingerprint(resumed.next())) for _ in range(20 - k)] == steps[k:]


# ---------------------------------------------------------------- one decode per picture and block

def test_a_picture_is_decoded_once_per_block(tmp_path, monkeypatch):
    shards = write_pictures(tmp_path, pictures(), per_shard=6)
    calls = Counter()
    real = data.pixels.decode_image

    def counting(raw_bytes, max_pixels):
        calls[hashlib.sha256(raw_bytes).hexdigest()] += 1
        return real(raw_bytes, max_pixels)

    monkeypatch.setattr("data.pixels.decode_image", counting)
    spec = spec_of(shards, n_streams=1, batch_size=4, shuffle_buffer=64, epochs=1)  # one block: every pair
    assert sum(len(b) for b in one_epoch(spec)) == sum(CAPTIONS)
    assert len(calls) == len(CAPTIONS) and set(calls.values()) == {1}


# ---------------------------------------------------------------- bad input

def test_bad_caption_lists_are_counted_once_and_never_stop_the_reader(tmp_path):
    good = pictures((2, 1))
    bad = pictures((1, 1, 1, 1, 1, 3, 3, 1), prefix="b")
    bad[0]["json"]["captions"] = []  # no_captions
    bad[1]["json"]["captions"] = "a red cube"  # bad_captions: not a list
    bad[2]["json"]["captions"] = [1]  # bad_captions: not strings
    bad[3]["json"]["caption_ids"] = ["x", "y"]  # bad_captions: ids do not match the captions
    bad[4]["json"]["captions"] = ["a red cube"] * (DEFAULT_MAX_CAPTIONS + 1)  # too_many_captions
    bad[5]["json"]["captions"][1] = "bad \x01 caption"  # bad_caption: that pair alone
    bad[6]["png"] = b"\x89PNG\r\n\x1a\n not a picture"  # bad_image: each of its 3 pairs
    bad[7]["json"] = b'{"image_id": "img-x", "captions": ['  # bad_json
    data = write_pictures(tmp_path, good[:1] + bad + good[1:], per_shard=4)
    assert read_manifest(data, PIXEL_FORMAT).pairs == [5, 8, 2]  # a bad list is one unit, as the reader counts
    spec = spec_of(data, n_streams=1, batch_size=4, shuffle_buffer=0, epochs=1)
    it = loader(spec, streams=[0])
    keys = [p[2] for b in it for p in b["pairs"]]
    assert sorted(keys) == ["bc5-0", "bc5-2", "c0-0", "c0-1", "c1-0"]  # (shards are read in a shuffled order)
    assert it.skip_counts == {"no_captions": 1, "bad_captions": 3, "too_many_captions": 1, "bad_caption": 1,
                              "bad_image": 3, "bad_json": 1}
    assert it.seen == 15  # pairs and bad units read: 3 good + 5 bad lists + 3 + 3 pairs + 1 bad JSON


def test_a_shard_with_more_pairs_than_listed_is_read_as_far_as_listed(tmp_path, caplog):
    data = write_pictures(tmp_path, pictures((2, 2, 3)), per_shard=3)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["num_pairs"] = manifest["num_pairs"] = 6  # the last picture's third caption unlisted
    (data / "manifest.json").write_text(json.dumps(manifest))
    it = loader(spec_of(data, n_streams=1, batch_size=2, shuffle_buffer=0, epochs=1), streams=[0])
    assert len([p for b in it for p in b["pairs"]]) == 6
    assert it.skip_counts == {"manifest_mismatch": 1}


def test_picture_manifests_need_their_pair_counts(tmp_path):
    data = write_pictures(tmp_path / "v2", pictures((2, 1)), per_shard=2)
    raw = json.loads((data / "manifest.json").read_text())
    assert raw["num_pairs"] == 3 and raw["shards"][0]["num_pairs"] == 3
    for bad in (None, 1, "3"):  # missing, fewer than the pictures, not an int
        broken = {**raw, "shards": [{**raw["shards"][0], "num_pairs": bad}]}
        if bad is None:
            del broken["shards"][0]["num_pairs"]
        (data / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="is invalid"):
            read_manifest(data, PIXEL_FORMAT)
    v1 = read_manifest(write_pictures(tmp_path / "v1", pictures((2, 1)), 2, PIXEL_FORMAT_V1), PIXEL_FORMAT)
    assert v1.meta["format"] == PIXEL_FORMAT_V1 and v1.pairs == [] and v1.units == v1.counts == [3]
    with pytest.raises(ValueError, match="expected 'vlpt-regions-v1'"):
        read_manifest(data)


def test_the_builder_groups_captions_by_picture_and_splits_long_lists():
    def entry(key, image_id, caption):
        return Entry(key, f"/img/{image_id}.jpg", image_id, caption, key, 10, 0)

    rows = [entry("a-1", "a", "x"), entry("b-1", "b", "y"), entry("a-2", "a", "z"), entry("a-3", "a", "w"),
            entry("a-4", "a", "v"), entry("a-5", "a", "u")]
    got = [(p.key, p.image_id, p.captions) for p in _pictures(rows, max_captions=2)]
    assert got == [("a-1", "a", ("x", "z")), ("a-3", "a", ("w", "v")), ("a-5", "a", ("u",)), ("b-1", "b", ("y",))]


# ---------------------------------------------------------------- vlpt bench data

def test_bench_data_times_picture_shards(pixel_data, tmp_path, capsys):
    from data.vocab import DEMO_VOCAB_PATH
    from vlpt.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data", str(pixel_data / "train"), "--vocab", str(DEMO_VOCAB_PATH),
                 "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "no padding figures" in printed
    result = json.loads(out.read_text())
    (one,) = result["throughput"]
    assert result["padding"] is None and result["config"]["task"] == "albef"
    assert one["samples"] == sum(read_manifest(pixel_data / "train", PIXEL_FORMAT).pairs) == 96  # every pair
    assert one["pictures"] and one["image_size"] == 32 and one["skipped"] == {}
    assert main(["bench", "data", "--data", str(pixel_data / "train"), "--vocab", str(DEMO_VOCAB_PATH),
                 "--pack-len", "64", "--out", str(tmp_path / "b.json")]) == 2
    assert "picture shards have no packed rows" in capsys.readouterr().err
