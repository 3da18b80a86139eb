"""The demo scenes (data/demo_scenes.py) as pictures, for ALBEF's pixel demo: the same
objects, boxes and captions as the region-feature demo (data/demo.py), drawn as coloured
silhouettes on a banded background (sky on top, floor at the bottom), so a caption is as
true of the picture as of the regions."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.demo_scenes import DEMO_COLOURS, DEMO_SHAPES, STUFF_BANDS, DemoScene, caption_samples, write_scene_shards
from data.shards import PIXEL_FORMAT, PIXEL_FORMAT_V1, PIXEL_FORMATS

COLOUR_RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50), "yellow": (240, 220, 40),
              "purple": (140, 50, 170), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
# Muted, unlike every object colour: the background never reads as an object.
BAND_RGB = ((150, 180, 205), (175, 185, 170), (150, 145, 135), (110, 95, 80))
assert set(COLOUR_RGB) == set(DEMO_COLOURS) and len(BAND_RGB) == STUFF_BANDS


def object_boxes(scene: DemoScene) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Each object once, with its more confident proposal (the box its captions describe)."""
    best: dict[tuple[int, int], int] = {}
    for i, obj in enumerate(scene.objects):
        if obj is not None and (obj not in best or scene.conf[i] > scene.conf[best[obj]]):
            best[obj] = i
    return [(obj, scene.norm_bb[i]) for obj, i in best.items()]


def _star(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    points = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], rgb) -> None:
    """One silhouette filling `box` (pixels); each shape has its own outline."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    edge = tuple(max(0, c - 70) for c in rgb)
    if shape == "cube":
        draw.rectangle(box, fill=rgb, outline=edge, width=max(1, int(min(w, h) / 8)))
    elif shape == "ball":
        draw.ellipse(box, fill=rgb)
    elif shape == "cone":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2 - h / 8), (x1, y2 - h / 8)], fill=rgb)
        draw.ellipse((x1, y2 - h / 4, x2, y2), fill=rgb)
    elif shape == "cylinder":
        draw.rectangle((x1, y1 + h / 8, x2, y2 - h / 8), fill=rgb)
        draw.ellipse((x1, y2 - h / 4, x2, y2), fill=rgb)
        draw.ellipse((x1, y1, x2, y1 + h / 4), fill=rgb, outline=edge)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(1, int(min(w, h) / 4)))
    elif shape == "star":
        draw.polygon(_star(x1, y1, x2, y2), fill=rgb)
    elif shape == "pyramid":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=rgb, outline=edge)
        draw.line([((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2)], fill=edge, width=1)
    elif shape == "disk":
        draw.ellipse((x1, y1 + h / 4, x2, y2 - h / 4), fill=rgb)
    else:
        raise ValueError(f"unknown demo shape {shape!r}; known: {', '.join(DEMO_SHAPES)}")


def render_scene(scene: DemoScene, size: int = 128) -> Image.Image:
    """The scene as a `size` x `size` RGB picture."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    band = size / STUFF_BANDS
    for k, rgb in enumerate(BAND_RGB):
        draw.rectangle((0, round(k * band), size, round((k + 1) * band)), fill=rgb)
    for (shape, colour), bb in object_boxes(scene):
        box = tuple(float(v) * size for v in bb[:4])
        draw_shape(draw, DEMO_SHAPES[shape], box, COLOUR_RGB[DEMO_COLOURS[colour]])
    return img


def scene_samples(scene: DemoScene, image_size: int, fmt: str = PIXEL_FORMAT) -> list[dict]:
    """The scene drawn as a PNG of side `image_size`: one shard sample holding it with all its
    captions (vlpt-pixels-v2, as `vlpt shards coco`), or with `fmt` PIXEL_FORMAT_V1 one sample per
    (scene, caption) pair, the picture repeated. Keys and caption ids are the same in both."""
    buf = io.BytesIO()
    render_scene(scene, image_size).save(buf, format="PNG")
    one_per_caption = caption_samples(scene, {"png": buf.getvalue()})
    if fmt == PIXEL_FORMAT_V1:
        return one_per_caption
    metas = [s["json"] for s in one_per_caption]
    meta = {"image_id": scene.image_id, "captions": [m["caption"] for m in metas],
            "caption_ids": [m["caption_id"] for m in metas]}
    return [{"__key__": scene.image_id, "json": meta, "png": buf.getvalue()}]


def write_demo_pixels(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_scenes: int = 2000,
    n_val_scenes: int = 250,
    image_size: int = 96,
    img_dim: int = 64,
    scenes_per_shard: int = 250,
    noise_std: float = 0.5,
    fmt: str = PIXEL_FORMAT,
) -> dict:
    """Write `out_dir/train/` and `out_dir/val/` (pixel shards + manifest.json); return a summary.

    The same scenes and captions as `write_demo_dataset` with the same seed, img_dim and
    noise_std (they shape the scene stream), drawn as pictures; byte-identical for the same arguments.
    `fmt`: PIXEL_FORMAT (one sample per picture) or the older PIXEL_FORMAT_V1 (one per caption,
    kept to compare sizes and to test its reader). Either way the readers' epochs hold the same
    (picture, caption) pairs in the same order: a scene's captions are consecutive in both.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 (one ViT patch), got {image_size}")
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"fmt must be one of {PIXEL_FORMATS}, got {fmt!r}")

    def split_meta(split: str, n_scenes: int) -> dict:
        return {"split": split, "num_scenes": n_scenes, "generator": "vlpt-demo-pixels", "seed": seed,
                "image_size": image_size}

    summary = write_scene_shards(out_dir, seed=seed, n_train_scenes=n_train_scenes, n_val_scenes=n_val_scenes,
                                 img_dim=img_dim, scenes_per_shard=scenes_per_shard, noise_std=noise_std,
                                 to_samples=lambda scene: scene_samples(scene, image_size, fmt),
                                 split_meta=split_meta, fmt=fmt, kind={"image_size": image_size, "format": fmt})
    for split in ("train", "val"):  # v1 samples are pairs; v2 manifests count them
        manifest = json.loads(Path(summary[split]["manifest"]).read_text())
        summary[split]["pairs"] = manifest.get("num_pairs", manifest["num_samples"])
    summary["num_pairs"] = summary["train"]["pairs"] + summary["val"]["pairs"]
    return summary
