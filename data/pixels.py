"""Pixels for ALBEF: decode, then random-resized crop, horizontal flip and a RandAugment-style
policy for training; a plain resize for evaluation (ALBEF's recipe; docs/models.md, "Pictures and
captions"). PIL and NumPy
only, every random choice drawn from the caller's generator so a resumed run redraws them.

A horizontal flip swaps "left" and "right" in the caption too (`swap_left_right`): ALBEF
flips without it, which teaches wrong relations on captions that name sides (ours do).
"""
from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from data.limits import DecodeLimits

# CLIP's normalisation, which ALBEF uses.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
FILL = (128, 128, 128)
MAX_LEVEL = 10.0
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Decoders PIL may use: shards hold photos, and other plugins (EPS runs Ghostscript) are no
attack surface worth having."""
RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@dataclass(frozen=True)
class PixelConfig:
    image_size: int = 256
    """Side of the square model input (ALBEF pretraining: 256)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Random-resized crop: area fraction of the image (ALBEF: 0.5-1)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    randaug_ops: int = 2
    """Ops drawn per image (each then applied with probability 0.5); 0 turns RandAugment off."""
    randaug_magnitude: int = 7
    """0-10 (ALBEF: 7)."""

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if self.image_size <= 0 or not 0 < lo <= hi <= 1 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("pixels: image_size > 0, 0 < crop_scale[0] <= crop_scale[1] <= 1 and "
                             "0 < crop_ratio[0] <= crop_ratio[1]")
        if not 0 <= self.hflip_prob <= 1 or self.randaug_ops < 0 or not 0 <= self.randaug_magnitude <= MAX_LEVEL:
            raise ValueError("pixels: hflip_prob in [0, 1], randaug_ops >= 0, randaug_magnitude in [0, 10]")


class ImageTooLargeError(ValueError):
    """A picture's header declares more pixels than the budget (a decompression bomb)."""


def decode_image(data: bytes, max_pixels: int = DecodeLimits.max_image_pixels) -> Image.Image:
    """JPEG/PNG/WebP bytes -> RGB image. ImageTooLargeError when the header declares more than
    `max_pixels` pixels (checked before decoding), ValueError when they are not such an image."""
    img = open_image(data, max_pixels)
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None


def open_image(data: bytes, max_pixels: int = DecodeLimits.max_image_pixels) -> Image.Image:
    """JPEG/PNG/WebP bytes -> a PIL image of which only the header was read (the shard builders
    check their sources with it); the same errors as `decode_image` for a bad header."""
    try:
        with warnings.catch_warnings():
            # The budget below decides; PIL's warning would only announce a decode it then allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's process-wide limit, which other code may lower
        raise ImageTooLargeError(str(e)) from None
    except Exception as e:  # malformed files fail in many ways inside PIL's plugins; all mean the same here
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLargeError(f"{img.width}x{img.height} pixels, over the budget of {max_pixels}")
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> normalised float32 [3, H, W]."""
    x = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy())


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop of `scale` x the area at an aspect ratio in
    `ratio` (log-uniform); after 10 misses, the largest centred crop within `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


def apply_op(img: Image.Image, op: str, magnitude: float, rng: np.random.Generator) -> Image.Image:
    """One RandAugment op at `magnitude` (0-10), with ALBEF's level ranges."""
    level = magnitude / MAX_LEVEL
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op in ("Brightness", "Sharpness"):
        enhancer = ImageEnhance.Brightness if op == "Brightness" else ImageEnhance.Sharpness
        return enhancer(img).enhance(level * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):
        s = _signed(level * 0.3, rng)
        coeffs = (1, s, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, fillcolor=FILL)
    if op in ("TranslateX", "TranslateY"):
        t = _signed(level * 10.0, rng)  # pixels
        coeffs = (1, 0, t, 0, 1, 0) if op == "TranslateX" else (1, 0, 0, 0, 1, t)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, fillcolor=FILL)
    if op == "Rotate":
        return img.rotate(_signed(level * 30.0, rng), fillcolor=FILL)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(RANDAUG_OPS)}")


def rand_augment(img: Image.Image, n_ops: int, magnitude: float, rng: np.random.Generator) -> Image.Image:
    """ALBEF's RandomAugment: `n_ops` ops drawn with replacement, each applied with probability 0.5."""
    for i in rng.integers(0, len(RANDAUG_OPS), size=n_ops):
        if rng.random() < 0.5:
            img = apply_op(img, RANDAUG_OPS[int(i)], magnitude, rng)
    return img


def train_pixels(img: Image.Image, cfg: PixelConfig, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """Training view [3, S, S] and whether it was mirrored (the caller swaps left/right)."""
    box = crop_box(img.width, img.height, cfg.crop_scale, cfg.crop_ratio, rng)
    out = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC, box=box)
    flipped = bool(rng.random() < cfg.hflip_prob)
    if flipped:
        out = ImageOps.mirror(out)
    out = rand_augment(out, cfg.randaug_ops, cfg.randaug_magnitude, rng)
    return to_tensor(out), flipped


def eval_pixels(img: Image.Image, cfg: PixelConfig) -> torch.Tensor:
    """Evaluation view [3, S, S]: the whole image resized (bicubic)."""
    return to_tensor(img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC))


_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: whole words `left` <-> `right`, case kept."""
    def swap(m: re.Match) -> str:
        word = "right" if m.group(1).lower() == "left" else "left"
        return word.capitalize() if m.group(1)[0].isupper() else word
    return _SIDES.sub(swap, caption)
