"""ALBEF's pixel pipeline: decode, random-resized crop, flip (with the caption's sides swapped),
RandAugment-style ops, normalisation; deterministic in the caller's generator."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.pixels import (MEAN, RANDAUG_OPS, STD, PixelConfig, apply_op, crop_box, decode_image, eval_pixels,
                         swap_left_right, train_pixels)


def picture(w: int = 80, h: int = 60) -> Image.Image:
    """Left half red, right half blue: a mirror is easy to see."""
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[:, : w // 2] = (220, 20, 20)
    x[:, w // 2:] = (20, 20, 220)
    return Image.fromarray(x)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_gives_rgb_and_refuses_garbage():
    grey = Image.fromarray(np.full((5, 7), 100, dtype=np.uint8), mode="L")
    assert decode_image(png_bytes(grey)).mode == "RGB"
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(b"\x89PNG not really")


def test_crop_boxes_stay_inside_with_the_asked_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = crop_box(80, 60, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
        w, h = right - left, bottom - top
        assert 0.5 * 4800 * 0.9 <= w * h <= 4800  # rounding of the sides
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Nothing of ratio 10 fits: the largest centred crop within it.
    assert crop_box(80, 60, (0.9, 1.0), (10.0, 10.0), np.random.default_rng(0)) == (0, 26, 80, 34)


def test_eval_is_a_bicubic_resize_normalised():
    img = picture()
    got = eval_pixels(img, PixelConfig(image_size=32))
    want = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    want = torch.from_numpy(((want - MEAN) / STD).transpose(2, 0, 1))
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_train_view_is_deterministic_in_the_generator():
    cfg = PixelConfig(image_size=32)
    a, fa = train_pixels(picture(), cfg, np.random.default_rng(5))
    b, fb = train_pixels(picture(), cfg, np.random.default_rng(5))
    c, _ = train_pixels(picture(), cfg, np.random.default_rng(6))
    assert torch.equal(a, b) and fa == fb and not torch.equal(a, c)


def test_flip_mirrors_the_image():
    whole = PixelConfig(image_size=32, crop_scale=(1.0, 1.0), crop_ratio=(80 / 60, 80 / 60), randaug_ops=0,
                        hflip_prob=1.0)
    view, flipped = train_pixels(picture(), whole, np.random.default_rng(0))
    assert flipped
    torch.testing.assert_close(view, eval_pixels(picture(), whole).flip(-1))
    assert view[2, :, :8].mean() > view[0, :, :8].mean()  # blue now on the left
    kept, flipped = train_pixels(picture(), PixelConfig(image_size=32, hflip_prob=0.0, randaug_ops=0),
                                 np.random.default_rng(0))
    assert not flipped and kept[0, :, :4].mean() > kept[2, :, :4].mean()


@pytest.mark.parametrize("op", RANDAUG_OPS)
def test_every_randaugment_op_keeps_size_and_mode(op):
    out = apply_op(picture(), op, 7, np.random.default_rng(0))
    assert out.size == (80, 60) and out.mode == "RGB"
    if op in ("ShearX", "TranslateX", "Rotate", "Brightness"):
        assert np.asarray(out).tolist() != np.asarray(picture()).tolist()


def test_unknown_op_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op(picture(), "Solarize", 7, np.random.default_rng(0))
    for bad in ({"crop_scale": (0.0, 1.0)}, {"hflip_prob": 1.5}, {"randaug_magnitude": 11}, {"image_size": 0}):
        with pytest.raises(ValueError, match="pixels:"):
            PixelConfig(**bad)


def test_swap_left_right_swaps_whole_words_only():
    assert swap_left_right("a red cube left of a blue ball") == "a red cube right of a blue ball"
    assert swap_left_right("Right of the door, left of the bin") == "Left of the door, right of the bin"
    assert swap_left_right("leftover bright rightmost") == "leftover bright rightmost"
