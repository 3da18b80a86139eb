"""Region masking (UNITER's `_get_img_mask`) and the MRM collate (docs/models.md, "Region masking")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.collate import collate_itm, collate_mlm, collate_mrm
from data.masking import mask_regions
from data.shards import RegionSample
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from kernels.masked_gather import masked_gather

DIM, LABELS = 6, 5


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _sample(i: int, n_words: int, n_bb: int) -> RegionSample:
    gen = np.random.default_rng(100 + i)
    soft = gen.random((n_bb, LABELS)).astype(np.float32)
    return RegionSample(
        key=f"s{i}",
        image_id=f"img{i}",
        input_ids=np.arange(10 + 10 * i, 10 + 10 * i + n_words, dtype=np.int64),
        img_feat=gen.standard_normal((n_bb, DIM)).astype(np.float32) + i + 0.5,  # no zero rows
        img_pos=gen.random((n_bb, 7)).astype(np.float32),
        soft_labels=soft / soft.sum(1, keepdims=True),
    )


# mixed text lengths (txt_lens 5, 3, 9, 4) and region counts (2, 7, 1, 4): Lt = 9, Ni = 7, L = 10
MIXED = [_sample(0, 3, 2), _sample(1, 1, 7), _sample(2, 7, 1), _sample(3, 2, 4)]


# ------------------------------------------------------------ mask_regions

@pytest.mark.parametrize("num_bb", [5, 50])
def test_mask_regions_rate(num_bb):
    # P(region masked) = p + (1 - p)^n / n: Bernoulli(p) each, plus the forced one when none was drawn
    p, draws = 0.15, 20_000
    rng = np.random.default_rng(0)
    masks = np.stack([mask_regions(num_bb, rng) for _ in range(draws)])  # [draws, n]
    assert masks.dtype == bool and masks.shape == (draws, num_bb)
    assert masks.any(axis=1).all()  # at least one region, always
    expected = p + (1 - p) ** num_bb / num_bb
    std = np.sqrt(expected * (1 - expected) / masks.size)
    assert abs(masks.mean() - expected) < 5 * std
    # no region position is favoured
    per_slot = masks.mean(axis=0)
    assert np.abs(per_slot - expected).max() < 5 * np.sqrt(expected * (1 - expected) / draws)


def test_mask_regions_at_least_one_uniform_and_draw_order():
    counts = np.zeros(4, dtype=np.int64)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(2000):
        m = mask_regions(4, rng, prob=1e-12)  # nothing selected: exactly one forced
        assert m.sum() == 1
        u = ref.random(4)  # documented order: one uniform per region, then integers(num_bb)
        assert not (u < 1e-12).any()
        assert int(np.flatnonzero(m)[0]) == int(ref.integers(4))
        counts += m
    assert counts.min() > 400  # ~500 each: the forced region is uniform
    assert mask_regions(1, np.random.default_rng(0)).tolist() == [True]


def test_mask_regions_deterministic_and_checks():
    a = [mask_regions(30, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    rng = np.random.default_rng(7)
    u = np.random.default_rng(7).random(30)
    assert np.array_equal(mask_regions(30, rng, prob=0.4), u < 0.4)  # some drawn: no extra draw
    with pytest.raises(ValueError, match="at least one region"):
        mask_regions(0, np.random.default_rng(0))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="probability"):
            mask_regions(3, np.random.default_rng(0), prob=bad)


# ------------------------------------------------------------ collate_mrm

def _expected_masks(seed: int, prob: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [mask_regions(len(s.img_feat), rng, prob) for s in MIXED]  # per sample, in order


@pytest.mark.parametrize("seed,prob", [(0, 0.15), (1, 0.5), (2, 0.5)])
def test_collate_mrm_inputs_targets_and_index(tok, seed, prob):
    batch = collate_mrm(MIXED, np.random.default_rng(seed), tok, mrm_prob=prob)
    masks = _expected_masks(seed, prob)
    b, ni = len(MIXED), max(len(s.img_feat) for s in MIXED)
    lt, out_len = batch["input_ids"].shape[1], batch["attn_masks"].shape[1]
    assert (lt, out_len) == (9, 10)  # L = max(txt_len + num_bb) = 3 + 7 = 9 + 1

    img_masks = batch["img_masks"]
    assert img_masks.dtype == torch.bool and img_masks.shape == (b, ni)
    for i, (s, m) in enumerate(zip(MIXED, masks)):
        n = len(s.img_feat)
        assert img_masks[i, :n].numpy().tolist() == m.tolist()
        assert not img_masks[i, n:].any()  # False at pads
        feat = batch["img_feat"][i, :n].numpy()
        assert (feat[m] == 0).all()  # masked input rows exactly 0
        assert np.array_equal(feat[~m], s.img_feat[~m])  # the others untouched
        assert np.array_equal(batch["img_pos_feat"][i, :n].numpy(), s.img_pos)  # boxes stay
        assert (batch["img_feat"][i, n:] == 0).all()

    # targets: original features / soft labels of the masked regions, sample by sample, region by region
    ref = [(i, j) for i, m in enumerate(masks) for j in np.flatnonzero(m)]
    assert batch["n_items"] == len(ref) == int(sum(m.sum() for m in masks)) >= b
    assert batch["mrfr_targets"].dtype == batch["mrc_soft_labels"].dtype == torch.float32
    assert batch["mrfr_targets"].shape == (len(ref), DIM) and batch["mrc_soft_labels"].shape == (len(ref), LABELS)
    for n, (i, j) in enumerate(ref):
        assert np.array_equal(batch["mrfr_targets"][n].numpy(), MIXED[i].img_feat[j])
        assert np.array_equal(batch["mrc_soft_labels"][n].numpy(), MIXED[i].soft_labels[j])

    # mrm_index: build the packed sequence by hand from gather_index with a tag per slot
    assert batch["mrm_index"].dtype == torch.long
    tags = np.full((b, lt + ni), -1, dtype=np.int64)  # text slots: -1
    tags[:, lt:] = np.arange(ni)  # region slot lt + j: j
    packed = np.take_along_axis(tags, batch["gather_index"].numpy(), axis=1)  # [B, L]
    attn = batch["attn_masks"].numpy()
    hand = []
    for i, j in ref:
        (pos,) = np.flatnonzero((packed[i] == j) & (attn[i] == 1))
        hand.append(i * out_len + pos)
        assert pos == int(batch["txt_lens"][i]) + j
    assert batch["mrm_index"].tolist() == hand

    # and through the real gather: packed hidden states at mrm_index are the masked regions' states
    txt = torch.zeros(b, lt, 2)
    img = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(ni), indexing="ij"), -1).float() + 1  # [B, Ni, 2]
    hidden = torch.gather(torch.cat([txt, img], 1), 1, batch["gather_index"][..., None].expand(-1, -1, 2))
    got = masked_gather(hidden, batch["mrm_index"])  # [N, 2]
    assert got.tolist() == [[i + 1.0, j + 1.0] for i, j in ref]


def test_collate_mrm_masks_no_text_and_keeps_common_keys(tok):
    plain = collate_itm(MIXED, np.random.default_rng(0), tok, neg_prob=0.0)  # masks nothing
    for seed in range(5):
        batch = collate_mrm(MIXED, np.random.default_rng(seed), tok)
        for key in ("input_ids", "position_ids", "txt_lens", "attn_masks", "gather_index",
                    "img_pos_feat", "num_bbs"):
            assert torch.equal(batch[key], plain[key]), key
        assert batch["keys"] == plain["keys"] and batch["image_ids"] == plain["image_ids"]
        assert not (batch["input_ids"] == tok.mask_id).any()
        assert "txt_labels" not in batch and "mlm_index" not in batch and "itm_targets" not in batch
        assert batch["task"] == "mrm"
    assert collate_mrm(MIXED, np.random.default_rng(0), tok, task="mrc-kl")["task"] == "mrc-kl"


def test_collate_mlm_masks_no_region(tok):
    for seed in range(5):
        batch = collate_mlm(MIXED, np.random.default_rng(seed), tok)
        assert "img_masks" not in batch and "mrm_index" not in batch
        for i, s in enumerate(MIXED):
            n = len(s.img_feat)
            assert torch.equal(batch["img_feat"][i, :n], torch.from_numpy(s.img_feat))
            assert torch.equal(batch["img_pos_feat"][i, :n], torch.from_numpy(s.img_pos))


def test_collate_mrm_deterministic_and_checks(tok):
    a = collate_mrm(MIXED, np.random.default_rng(4), tok)
    b = collate_mrm(MIXED, np.random.default_rng(4), tok)
    for key in ("img_masks", "mrm_index", "img_feat", "mrfr_targets", "mrc_soft_labels"):
        assert torch.equal(a[key], b[key])
    # the collate does not modify the samples it was given
    assert all((s.img_feat != 0).all() for s in MIXED)
    with pytest.raises(ValueError, match="empty"):
        collate_mrm([], np.random.default_rng(0), tok)
    odd = _sample(9, 2, 3)
    odd.soft_labels = np.full((3, LABELS + 1), 1 / (LABELS + 1), np.float32)
    with pytest.raises(ValueError, match="label_dim"):
        collate_mrm(MIXED[:1] + [odd], np.random.default_rng(0), tok)
