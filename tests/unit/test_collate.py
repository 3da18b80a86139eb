"""Packed UNITER batches (MLM, ITM) and sample decoding of bad inputs."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from data.collate import collate_itm, collate_mlm, packed_layout
from data.shards import RegionSample, decode_region_sample, encode_npz, iter_shard, write_shard
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH

DIM = 6


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _sample(i: int, n_words: int, n_bb: int, image_id: str | None = None) -> RegionSample:
    gen = np.random.default_rng(i)
    return RegionSample(
        key=f"s{i}",
        image_id=image_id or f"img{i}",
        input_ids=np.arange(10 + 10 * i, 10 + 10 * i + n_words, dtype=np.int64),
        img_feat=gen.standard_normal((n_bb, DIM)).astype(np.float32) + i,
        img_pos=gen.random((n_bb, 7)).astype(np.float32),
        soft_labels=np.full((n_bb, 9), 1 / 9, np.float32),
    )


MIXED = [_sample(0, 3, 2), _sample(1, 1, 4), _sample(2, 5, 1)]  # txt_lens 5, 3, 7; Lt = 7, Ni = 4, L = 8


# ------------------------------------------------------------ packed layout

def test_layout_matches_hand_computed(tok):
    batch = collate_itm(MIXED, np.random.default_rng(0), tok, neg_prob=0.0)
    assert batch["txt_lens"].tolist() == [5, 3, 7] and batch["num_bbs"].tolist() == [2, 4, 1]
    assert batch["input_ids"].tolist() == [
        [2, 10, 11, 12, 3, 0, 0],
        [2, 20, 3, 0, 0, 0, 0],
        [2, 30, 31, 32, 33, 34, 3],
    ]
    assert batch["position_ids"].tolist() == [list(range(7))]
    assert batch["attn_masks"].tolist() == [[1] * 7 + [0], [1] * 7 + [0], [1] * 8]
    assert batch["gather_index"].tolist() == [
        [0, 1, 2, 3, 4, 7, 8, 7],
        [0, 1, 2, 7, 8, 9, 10, 7],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]
    assert batch["img_feat"].shape == (3, 4, DIM) and batch["img_pos_feat"].shape == (3, 4, 7)
    assert (batch["img_feat"][0, 2:] == 0).all() and (batch["img_pos_feat"][2, 1:] == 0).all()
    assert batch["input_ids"].dtype == batch["gather_index"].dtype == batch["attn_masks"].dtype == torch.long
    assert batch["img_feat"].dtype == torch.float32
    assert batch["keys"] == ["s0", "s1", "s2"] and batch["image_ids"] == ["img0", "img1", "img2"]


def test_gather_packs_text_then_regions_without_holes(tok):
    batch = collate_itm(MIXED, np.random.default_rng(0), tok, neg_prob=0.0)
    b, lt = batch["input_ids"].shape
    txt = batch["input_ids"].float().unsqueeze(-1)  # [B, Lt, 1]: token id as the "hidden state"
    img = batch["img_feat"][..., :1] + 1000  # [B, Ni, 1]
    packed = torch.gather(torch.cat([txt, img], 1), 1, batch["gather_index"].unsqueeze(-1))  # [B, L, 1]
    for i, s in enumerate(MIXED):
        tl, nbb = int(batch["txt_lens"][i]), int(batch["num_bbs"][i])
        assert torch.equal(packed[i, :tl, 0], txt[i, :tl, 0])
        assert torch.equal(packed[i, tl : tl + nbb, 0], torch.from_numpy(s.img_feat[:, 0]) + 1000)
        assert int(batch["attn_masks"][i].sum()) == tl + nbb


def test_packed_layout_single_row():
    attn, gather = packed_layout(np.array([4]), np.array([3]), 4)
    assert attn.tolist() == [[1] * 7] and gather.tolist() == [[0, 1, 2, 3, 4, 5, 6]]


# ------------------------------------------------------------ MLM

def test_mlm_index_points_at_labelled_positions(tok):
    samples = [_sample(i, int(n), int(k)) for i, (n, k) in enumerate([(7, 3), (2, 5), (12, 1), (4, 4)])]
    for seed in range(20):
        batch = collate_mlm(samples, np.random.default_rng(seed), tok)
        labels = batch["txt_labels"]  # [B, Lt]
        b, lt = labels.shape
        out_len = batch["attn_masks"].shape[1]
        rows, cols = (labels != -1).nonzero(as_tuple=True)
        assert batch["mlm_index"].tolist() == (rows * out_len + cols).tolist()
        assert batch["mlm_targets"].tolist() == labels[rows, cols].tolist()
        assert batch["n_items"] == len(rows) >= len(samples)  # at least one target per sample
        originals = [s.input_ids[c - 1] for r, c in zip(rows.tolist(), cols.tolist()) for s in [samples[r]]]
        assert batch["mlm_targets"].tolist() == originals
        flat_gather = batch["gather_index"].reshape(-1)[batch["mlm_index"]]
        assert (flat_gather < lt).all()  # every target sits on a text slot of the packed sequence
        assert (flat_gather == cols).all()


def test_mlm_leaves_images_untouched(tok):
    batch = collate_mlm(MIXED, np.random.default_rng(1), tok)
    for i, s in enumerate(MIXED):
        n = len(s.img_feat)
        assert torch.equal(batch["img_feat"][i, :n], torch.from_numpy(s.img_feat))
        assert torch.equal(batch["img_pos_feat"][i, :n], torch.from_numpy(s.img_pos))
    assert batch["task"] == "mlm" and "itm_targets" not in batch


def test_mlm_deterministic(tok):
    a = collate_mlm(MIXED, np.random.default_rng(5), tok)
    b = collate_mlm(MIXED, np.random.default_rng(5), tok)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mlm_index"], b["mlm_index"])


# ------------------------------------------------------------ ITM

def _image_owner(batch, i: int, samples) -> int:
    """Which original sample's image row i of the batch holds."""
    n = int(batch["num_bbs"][i])
    return next(j for j, s in enumerate(samples)
                if len(s.img_feat) == n and torch.equal(batch["img_feat"][i, :n], torch.from_numpy(s.img_feat)))


def test_itm_negatives_and_targets(tok):
    # pairs of samples share an image (two captions per image), as in the demo data
    samples = [_sample(i, 2 + i % 3, 1 + i % 4, image_id=f"img{i // 2}") for i in range(16)]
    for k, s in enumerate(samples):  # same image -> same regions
        if k % 2:
            s.img_feat, s.img_pos = samples[k - 1].img_feat, samples[k - 1].img_pos
    rng = np.random.default_rng(0)
    n_neg = n_total = 0
    for _ in range(150):
        batch = collate_itm(samples, rng, tok)
        targets = batch["itm_targets"].tolist()
        for i, t in enumerate(targets):
            owner = samples[_image_owner(batch, i, samples)]
            assert (owner.image_id == samples[i].image_id) == (t == 1)
        assert batch["n_items"] == len(samples) and batch["task"] == "itm"
        assert torch.equal(batch["input_ids"][:, 1], torch.tensor([s.input_ids[0] for s in samples]))
        n_neg += targets.count(0)
        n_total += len(targets)
    assert abs(n_neg / n_total - 0.5) < 0.04


def test_itm_single_image_batch_stays_positive(tok):
    samples = [_sample(i, 3, 2, image_id="same") for i in range(4)]
    batch = collate_itm(samples, np.random.default_rng(0), tok, neg_prob=1.0)
    assert batch["itm_targets"].tolist() == [1, 1, 1, 1]


def test_itm_swaps_use_original_images(tok):
    batch = collate_itm(MIXED, np.random.default_rng(3), tok, neg_prob=1.0)
    assert batch["itm_targets"].tolist() == [0, 0, 0]
    owners = [_image_owner(batch, i, MIXED) for i in range(3)]
    assert all(o != i for i, o in enumerate(owners))
    assert batch["num_bbs"].tolist() == [len(MIXED[o].img_feat) for o in owners]


def test_collate_rejects_empty_batch(tok):
    with pytest.raises(ValueError):
        collate_itm([], np.random.default_rng(0), tok)


# ------------------------------------------------------------ decoding

def _raw(caption="a red cube left of a blue ball", n=3, dim=DIM, **override) -> dict:
    arrays = {
        "features": np.ones((n, dim), np.float16),
        "norm_bb": np.tile(np.array([0.1, 0.2, 0.5, 0.6, 0.4, 0.4], np.float32), (n, 1)),
        "conf": np.full(n, 0.9, np.float32),
        "soft_labels": np.full((n, 9), 1 / 9, np.float16),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    meta = {"image_id": "im1", "caption": caption, "caption_id": "k1"}
    return {"__key__": "k1", "json": json.dumps(meta).encode(), "npz": encode_npz(arrays)}


def test_decode_good_sample(tok):
    sample, reason = decode_region_sample(_raw(), tok, max_txt_len=60, img_dim=DIM, label_dim=9)
    assert reason is None and sample.key == "k1" and sample.image_id == "im1"
    assert tok.decode(sample.input_ids) == "a red cube left of a blue ball"
    assert sample.input_ids.dtype == np.int64 and sample.img_feat.dtype == np.float32
    assert sample.img_pos.shape == (3, 7)
    np.testing.assert_allclose(sample.img_pos[:, 6], 0.16, rtol=1e-6)  # w * h
    n = len(sample.input_ids)
    exact, _ = decode_region_sample(_raw(), tok, max_txt_len=n)
    assert exact.input_ids.tolist() == sample.input_ids.tolist()
    # UNITER drops, not truncates, captions over max_txt_len.
    assert decode_region_sample(_raw(), tok, max_txt_len=n - 1) == (None, "caption_too_long")


def _bad(kind: str) -> dict:
    raw = _raw()
    nan = np.ones((3, DIM), np.float16)
    nan[1, 2] = np.nan
    inf = np.ones((3, DIM), np.float16)
    inf[0, 0] = np.inf
    return {
        "missing_json": {k: v for k, v in raw.items() if k != "json"},
        "missing_npz": {k: v for k, v in raw.items() if k != "npz"},
        "bad_json": {**raw, "json": b"{oops"},
        "bad_npz": {**raw, "npz": b"PK\x03\x04 truncated"},
        "empty_caption": _raw(caption="   "),
        "nonfinite_features": _raw(features=nan),
        "nonfinite_inf": _raw(features=inf),
        "wrong_feature_dim": _raw(dim=DIM + 1),
        "missing_field": _raw(soft_labels=None),
        "bad_shape": _raw(norm_bb=np.zeros((2, 6), np.float32)),
        "no_regions": _raw(n=0),
        "missing_image_id": {**raw, "json": json.dumps({"caption": "a red cube"}).encode()},
    }[kind]


@pytest.mark.parametrize("kind", [
    "missing_json", "missing_npz", "bad_json", "bad_npz", "empty_caption", "nonfinite_features",
    "nonfinite_inf", "wrong_feature_dim", "missing_field", "bad_shape", "no_regions", "missing_image_id",
])
def test_decode_bad_inputs_return_reason(tok, kind):
    sample, reason = decode_region_sample(_bad(kind), tok, max_txt_len=60, img_dim=DIM, label_dim=9)
    assert sample is None
    assert reason == ("nonfinite_features" if kind == "nonfinite_inf" else kind)


# ------------------------------------------------------------ tar reading

def test_iter_shard_round_trip_and_truncation(tmp_path, tok):
    path = tmp_path / "s.tar"
    raws = [{"__key__": f"key-{i}", "json": {"image_id": f"im{i}", "caption": "a red cube", "caption_id": f"key-{i}"},
             "npz": {"features": np.ones((2, DIM), np.float16), "norm_bb": np.zeros((2, 6), np.float32),
                     "conf": np.ones(2, np.float32), "soft_labels": np.ones((2, 9), np.float16) / 9}}
            for i in range(5)]
    assert write_shard(path, raws) == 5
    got = list(iter_shard(path))
    assert [r["__key__"] for r in got] == [f"key-{i}" for i in range(5)]
    assert all(decode_region_sample(r, tok, 60, DIM, 9)[1] is None for r in got)
    with tarfile.open(path) as tar:
        member = tar.getmember("key-2.npz")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: member.offset_data + 100])  # stream breaks inside key-2's npz
    seen = []
    with pytest.raises(tarfile.TarError):
        for r in iter_shard(cut):
            seen.append(r["__key__"])
    assert seen == ["key-0", "key-1"]  # complete samples before the damage, never the partial one
    with tarfile.open(cut.with_suffix(".x"), "w") as bad:  # members without an extension are ignored
        info = tarfile.TarInfo("README")
        info.size = 2
        bad.addfile(info, io.BytesIO(b"hi"))
    assert list(iter_shard(cut.with_suffix(".x"))) == []
