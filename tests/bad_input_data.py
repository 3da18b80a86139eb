"""A tiny region-shard set with one planted bad sample of every skip reason (tests only)."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from data.demo import scene_samples
from data.demo_scenes import LABEL_DIM, generate_scenes
from data.shards import SKIP_REASONS, encode_npz, iter_shard, write_manifest, write_shard

IMG_DIM = 16


def good_samples(n: int, split: str = "train") -> list[dict]:
    out: list[dict] = []
    for scene in generate_scenes(split, (n + 1) // 2, seed=0, img_dim=IMG_DIM):
        out.extend(scene_samples(scene))
    return out[:n]


def _arrays(n_regions: int = 3) -> dict[str, np.ndarray]:
    return {"features": np.ones((n_regions, IMG_DIM), np.float16),
            "norm_bb": np.full((n_regions, 6), 0.5, np.float32),
            "conf": np.ones(n_regions, np.float32),
            "soft_labels": np.full((n_regions, LABEL_DIM), 1.0 / LABEL_DIM, np.float16)}


def bad_sample(reason: str, key: str) -> dict:
    """A sample that decode_region_sample (img_dim=16, max_txt_len<=60) skips for `reason`."""
    meta = {"image_id": f"img-{key}", "caption": "a red cube left of a blue ball", "caption_id": key}
    arrays = _arrays()
    sample: dict = {"__key__": key, "json": meta, "npz": None}
    if reason == "missing_json":
        del sample["json"]
    elif reason == "bad_json":
        sample["json"] = b"{not json"
    elif reason == "missing_image_id":
        del meta["image_id"]
    elif reason == "missing_caption":
        del meta["caption"]
    elif reason == "empty_caption":
        meta["caption"] = "   "
    elif reason == "missing_npz":
        del sample["npz"]
    elif reason == "bad_npz":
        sample["npz"] = b"this is not a zip file"
    elif reason == "missing_field":
        del arrays["norm_bb"]  # conf and soft_labels are optional; boxes are not
    elif reason == "no_regions":
        arrays = _arrays(0)
    elif reason == "wrong_feature_dim":
        arrays["features"] = np.ones((3, IMG_DIM // 2), np.float16)
    elif reason == "bad_shape":
        arrays["norm_bb"] = np.full((3, 5), 0.5, np.float32)
    elif reason == "nonfinite_features":
        arrays["features"][1, 2] = np.nan
    elif reason == "caption_too_long":
        meta["caption"] = " ".join(["red cube"] * 40)  # 80 word pieces > max_txt_len 60
    elif reason == "bad_caption":
        meta["caption"] = "a red \x00 cube"
    elif reason == "npz_too_large":
        from tests.adversarial.sample_attacks import npz_header_bomb
        sample["npz"] = npz_header_bomb()
    elif reason == "bad_boxes":
        arrays["norm_bb"][0, 0] = 1.5
    elif reason == "bad_soft_labels":
        arrays["soft_labels"][0, 0] = -0.5
    else:
        raise ValueError(reason)
    if "npz" in sample and sample["npz"] is None:
        sample["npz"] = encode_npz(arrays)
    return sample


SAMPLE_REASONS = tuple(r for r in SKIP_REASONS if r != "corrupt_tar")


def truncate_mid_member(path: Path, member_index: int) -> int:
    """Cut the tar in the middle of the data of its `member_index`-th member; return
    how many complete samples iter_shard still yields before it raises."""
    with tarfile.open(path) as tar:
        m = tar.getmembers()[member_index]
        cut = m.offset_data + max(m.size // 2, 1)
    with open(path, "r+b") as f:
        f.truncate(cut)
    readable = 0
    try:
        for _ in iter_shard(path):
            readable += 1
    except tarfile.TarError:
        return readable
    raise AssertionError(f"{path} still reads cleanly after truncation at {cut}")


def write_bad_dataset(out: Path, batch_size: int = 8, n_batches: int = 6, corrupt_first: int = 0,
                      n_shards: int = 3) -> dict:
    """`n_shards` train shards whose readable samples are exactly batch_size*n_batches,
    holding one bad sample of every per-sample reason, spread so each batch keeps good
    samples; shard `corrupt_first` is truncated mid-member. Returns the expectation."""
    split = out / "train"
    split.mkdir(parents=True, exist_ok=True)
    total = batch_size * n_batches
    paths = [split / f"shard-{i:06d}.tar" for i in range(n_shards)]
    pool = iter(good_samples(4 * total))
    # The corrupt shard: 10 good samples, cut inside the npz of sample 7 (members json, npz).
    write_shard(paths[corrupt_first], [next(pool) for _ in range(10)])
    readable_corrupt = truncate_mid_member(paths[corrupt_first], 2 * 7 + 1)
    rest = total - readable_corrupt
    bad = [bad_sample(r, f"bad-{i:02d}-{r.replace('_', '-')}") for i, r in enumerate(SAMPLE_REASONS)]
    n_good = rest - len(bad)
    assert n_good >= len(bad), "not enough room to keep every batch partly good"
    mixed: list[dict] = []
    for i in range(rest):  # one bad sample every ~2 samples
        if bad and i % 2 == 1:
            mixed.append(bad.pop(0))
        else:
            mixed.append(next(pool))
    assert not bad
    others = [p for i, p in enumerate(paths) if i != corrupt_first]
    per = -(-len(mixed) // len(others))
    counts = []
    for k, p in enumerate(paths):
        if k == corrupt_first:
            counts.append(10)
            continue
        j = others.index(p)
        counts.append(write_shard(p, mixed[j * per:(j + 1) * per]))
    # The manifest is written before nothing else touches the shards: checksums of the damaged file.
    write_manifest(split, paths, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts)
    expected = Counter({r: 1 for r in SKIP_REASONS})
    return {"skipped": dict(expected), "seen": total, "shards": [str(p) for p in paths],
            "readable_corrupt": readable_corrupt}


def epoch_shard_order(n_shards: int, seed: int, task: str) -> list[int]:
    """Epoch 0's shard order of a single-dataset task, as the loader draws it."""
    from data.loader import stable_id
    from data.sources import epoch_shard_order as shard_order

    return [int(i) for i in shard_order(n_shards, seed, stable_id(task), 0)]


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)
