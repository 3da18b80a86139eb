"""ALBEF batches: MLM masking as ALBEF's (only [PAD]/[CLS] protected, random ids from the whole
vocabulary, draw order reproduced by a scalar loop), mirrored pictures with mirrored captions,
truncation, batch-local image indices, and pixel-sample decoding that counts bad pictures."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.collate_albef import batch_image_index, caption_batch, collate_albef
from data.masking import mask_caption_tokens
from data.pixels import PixelConfig
from data.shards import PIXEL_SKIP_REASONS, PixelSample, decode_pixel_sample
from data.tokenizer import load_tokenizer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(REPO / "data/vocab/demo-vocab.txt")


def scalar_mask(ids, attn, rng, mask_id, vocab, prob):
    """ALBEF's rule position by position, drawing in the documented order."""
    u = rng.random(ids.shape)
    masked, labels, random_at = ids.copy(), np.full_like(ids, -1), []
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if attn[i, j] == 0 or j == 0 or u[i, j] >= prob:
                continue
            labels[i, j] = ids[i, j]
            if u[i, j] / prob < 0.8:
                masked[i, j] = mask_id
            elif u[i, j] / prob < 0.9:
                random_at.append((i, j))
    if random_at:
        for (i, j), v in zip(random_at, rng.integers(0, vocab, size=len(random_at))):
            masked[i, j] = v
    return masked, labels


def test_caption_masking_matches_a_scalar_loop_and_protects_only_pad_and_cls():
    rng_ids = np.random.default_rng(0)
    ids = rng_ids.integers(5, 100, size=(40, 12))
    attn = (np.arange(12)[None, :] < rng_ids.integers(3, 13, size=40)[:, None]).astype(np.int64)
    ids[:, 0] = 2
    got = mask_caption_tokens(ids, attn, np.random.default_rng(1), mask_id=4, vocab_size=100, prob=0.5)
    want = scalar_mask(ids, attn, np.random.default_rng(1), 4, 100, 0.5)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    masked, labels = got
    assert (labels[:, 0] == -1).all() and (labels[attn == 0] == -1).all()
    last = attn.sum(1) - 1  # the [SEP] column of each row
    assert (labels[np.arange(40), last] != -1).any()  # [SEP] can be a target
    random = (labels != -1) & (masked != 4) & (masked != ids)
    assert random.any() and (masked[random] < 5).any()  # the whole vocabulary, specials included


def test_caption_masking_refuses_bad_shapes():
    with pytest.raises(ValueError, match="equal"):
        mask_caption_tokens(np.zeros((2, 3)), np.zeros((2, 4)), np.random.default_rng(0), 1, 10)


def picture(colour=(200, 30, 30)) -> Image.Image:
    return Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8))


def test_collate_mirrors_captions_with_their_pictures_and_is_deterministic(tok):
    samples = [PixelSample(f"k{i}", f"img{i % 3}", "a red cube left of a blue ball", picture()) for i in range(8)]
    pixels = PixelConfig(image_size=32, hflip_prob=0.5, randaug_ops=0)
    a = collate_albef(samples, np.random.default_rng(5), tok, pixels, max_txt_len=20)
    b = collate_albef(samples, np.random.default_rng(5), tok, pixels, max_txt_len=20)
    assert all(torch.equal(a[k], b[k]) for k in ("pixels", "input_ids", "mlm_input_ids", "mlm_index"))
    assert a["pixels"].shape == (8, 3, 32, 32) and a["n_items"] == 8
    left, right = tok.encode("left")[0], tok.encode("right")[0]
    sides = [(row == left).any().item() for row in a["input_ids"]]
    assert any(sides) and not all(sides)  # some mirrored: "right of"
    assert all((row == right).any().item() != s for row, s in zip(a["input_ids"], sides))
    assert a["image_ids"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    flat = a["input_ids"].reshape(-1)
    assert torch.equal(flat[a["mlm_index"]], a["mlm_targets"])
    assert (a["mlm_input_ids"].reshape(-1)[a["mlm_index"]] != flat[a["mlm_index"]]).any()


def test_captions_are_truncated_not_dropped(tok):
    ids, attn = caption_batch(["a red cube left of a blue ball", "a ball"], tok, max_txt_len=3)
    assert ids.shape == (2, 5) and attn.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert ids[0, 0] == tok.cls_id and ids[0, 4] == tok.sep_id and ids[1, 4] == tok.pad_id


def test_batch_image_index_groups_equal_ids():
    assert batch_image_index(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("raw, reason", [
    ({"png": b"not a picture"}, "bad_image"),
    ({}, "missing_image"),
    ({"png": None, "caption": "\u200b\u200b"}, "empty_caption"),
])
def test_bad_pixel_samples_are_skipped_with_a_reason(tok, raw, reason):
    meta = {"image_id": "i", "caption": raw.pop("caption", "a red cube")}
    if raw.get("png", b"") is None:
        raw["png"] = png(picture())
    sample, why = decode_pixel_sample({"__key__": "k", "json": json.dumps(meta).encode(), **raw}, tok)
    assert sample is None and why == reason and reason in PIXEL_SKIP_REASONS


def test_a_good_pixel_sample_decodes(tok):
    raw = {"__key__": "k", "json": json.dumps({"image_id": "i", "caption": "a red cube"}).encode(),
           "jpg": png(picture())}  # the extension names the field; PIL reads the bytes whatever they are
    sample, why = decode_pixel_sample(raw, tok)
    assert why is None and sample.image.size == (40, 40) and sample.caption == "a red cube"
