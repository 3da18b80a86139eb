"""A deterministic, learnable demo dataset of synthetic "detector" scenes.

Each scene holds 2-4 coloured objects plus 1-3 background ("stuff") regions on
a unit canvas. Region features imitate a detector: `P_shape[s] + P_colour[c] +
noise` from fixed random prototypes, so shape and colour are recoverable from
the features, and captions ("a red cube left of a blue ball") are true to the
boxes. As in real images, context predicts a hidden region: every shape has
its typical box aspect ratio (towers are tall, disks wide), background looks
like what is at its height (sky on top, floor at the bottom: one stuff
prototype per horizontal band), and, like a real detector after NMS, every
object is proposed twice by overlapping boxes with their own noise and soft
labels. A model can therefore learn MLM (colour/shape/relation words), ITM
(does the caption fit these regions?) and masked region modelling (what was
under a masked box?) on a laptop in minutes.

This module is the scene model both demo writers share: data/demo.py writes the
scenes as region features (UNITER), data/demo_pixels.py draws them as pictures
(ALBEF). `write_scene_shards` is the split/shard/manifest loop they both run.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from data.shards import write_manifest, write_shard

DEMO_SHAPES = ("cube", "ball", "cone", "cylinder", "ring", "star", "pyramid", "disk")
DEMO_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
RELATIONS = ("left of", "right of", "above", "below", "next to")
# {a}/{b} are noun phrases ("a red cube"), {rel} one of RELATIONS.
CAPTION_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} and {b}")
TEMPLATE_PROBS = (0.4, 0.4, 0.2)
LABEL_DIM = 1 + len(DEMO_SHAPES)  # class 0 = background, 1 + shape index otherwise
NEAR_DIST = 0.15
"""Centres closer than this on both axes are "next to" each other."""

SHAPE_ASPECT = np.geomspace(1 / 2.5, 2.5, len(DEMO_SHAPES))
"""Typical width / height of each shape's box (adjacent shapes differ by 30%)."""
DEFAULT_NOISE_STD = 0.5
"""Feature noise of `vlpt demo-data` (noise-to-prototype magnitude)."""
STUFF_BANDS = 4
"""Background prototypes, one per horizontal band of the canvas."""
_SPLIT_STREAM = {"train": 1, "val": 2}  # child 0 of the seed draws the prototypes


def noun_phrase(colour: str, shape: str) -> str:
    """'a red cube' / 'an orange ball'."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def spatial_relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
    """Relation of A to B from the centres of two `norm_bb` rows [x1, y1, x2, y2, ...].

    Image y grows downwards, so a smaller centre y means "above". The dominant
    axis decides; centres within NEAR_DIST on both axes are "next to".
    """
    a = np.asarray(box_a, dtype=np.float64)
    b = np.asarray(box_b, dtype=np.float64)
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    if abs(dx) < NEAR_DIST and abs(dy) < NEAR_DIST:
        return "next to"
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def render_caption(template: int, a: tuple[int, int], b: tuple[int, int], rel: str) -> str:
    """Caption text for objects a, b given as (shape index, colour index)."""
    phrase = [noun_phrase(DEMO_COLOURS[c], DEMO_SHAPES[s]) for s, c in (a, b)]
    return CAPTION_TEMPLATES[template].format(a=phrase[0], b=phrase[1], rel=rel)


def all_demo_captions() -> Iterator[str]:
    """Every caption the generator can produce (the vocabulary's training corpus)."""
    objects = list(itertools.product(range(len(DEMO_SHAPES)), range(len(DEMO_COLOURS))))
    for a, b in itertools.permutations(objects, 2):
        for t, template in enumerate(CAPTION_TEMPLATES):
            rels = RELATIONS if "{rel}" in template else ("",)
            for rel in rels:
                yield render_caption(t, a, b, rel)


@dataclass
class DemoScene:
    """One synthetic image: its regions and two captions."""

    image_id: str
    objects: list[Optional[tuple[int, int]]]
    """Per region: (shape index, colour index), or None for background (each object twice)."""
    features: np.ndarray  # [n, img_dim] float16
    norm_bb: np.ndarray  # [n, 6] float32: x1, y1, x2, y2, w, h
    conf: np.ndarray  # [n] float32
    soft_labels: np.ndarray  # [n, LABEL_DIM] float16
    captions: list[str]


def demo_prototypes(seed: int, img_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed "detector": prototypes per shape [8, img_dim], colour [8, img_dim], stuff band [4, img_dim].

    Entries are N(0, 1), i.e. unit RMS per dimension, so `noise_std` is the
    noise-to-prototype magnitude ratio. Train and val share them (same detector).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0])
    p_shape = rng.standard_normal((len(DEMO_SHAPES), img_dim))
    p_colour = rng.standard_normal((len(DEMO_COLOURS), img_dim))
    p_stuff = rng.standard_normal((STUFF_BANDS, img_dim))
    return p_shape, p_colour, p_stuff


def stuff_band(norm_bb: np.ndarray) -> np.ndarray:
    """Band of each box's centre height, 0 (top) .. STUFF_BANDS - 1: [n, 6] -> [n] int."""
    centre_y = (norm_bb[:, 1] + norm_bb[:, 3]) / 2
    return np.minimum((centre_y * STUFF_BANDS).astype(np.int64), STUFF_BANDS - 1)


def _object_boxes(rng: np.random.Generator, shapes: list[int]) -> np.ndarray:
    """Boxes of side about 0.1-0.3 with each shape's aspect ratio (+-10%): [n, 6]."""
    n = len(shapes)
    side = rng.uniform(0.12, 0.22, size=n)  # [n] sqrt of the area
    aspect = SHAPE_ASPECT[shapes] * np.exp(rng.uniform(-0.1, 0.1, size=n))  # [n]
    wh = np.stack([side * np.sqrt(aspect), side / np.sqrt(aspect)], axis=1)  # [n, 2], at most 0.35
    xy = rng.uniform(0.0, 1.0, size=(n, 2)) * (1.0 - wh)  # top-left keeps the box on the canvas
    return np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)  # [n, 6]


def _random_boxes(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    wh = rng.uniform(lo, hi, size=(n, 2))  # [n, 2]
    xy = rng.uniform(0.0, 1.0, size=(n, 2)) * (1.0 - wh)  # top-left keeps the box on the canvas
    return np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)  # [n, 6]


def _overlapping_boxes(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """A second proposal per box: corners moved by up to 15% of the side (IoU 0.3-1, mostly > 0.6)."""
    wh = boxes[:, 4:6]  # [n, 2]
    shift = rng.uniform(-0.15, 0.15, size=(len(boxes), 4)) * np.tile(wh, 2)  # [n, 4]
    corners = np.clip(boxes[:, :4] + shift, 0.0, 1.0)  # [n, 4]
    return np.concatenate([corners, corners[:, 2:] - corners[:, :2]], axis=1).astype(np.float32)


def _soft_labels(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """Rows summing to 1 with 0.6-0.9 of the mass on `classes`, the rest spread at random."""
    n = len(classes)
    top = rng.uniform(0.6, 0.9, size=n)  # [n]
    rest = rng.dirichlet(np.ones(LABEL_DIM - 1), size=n) * (1.0 - top)[:, None]  # [n, K-1]
    out = np.empty((n, LABEL_DIM))
    for i, k in enumerate(classes):
        out[i, k] = top[i]
        out[i, np.arange(LABEL_DIM) != k] = rest[i]
    return out.astype(np.float16)


def _pick_captions(
    rng: np.random.Generator, scene_objects: list[Optional[tuple[int, int]]], norm_bb: np.ndarray
) -> list[str]:
    """Two captions about different object pairs where the scene has more than one pair."""
    rows = [i for i, o in enumerate(scene_objects) if o is not None]
    pairs = list(itertools.combinations(rows, 2))
    order = rng.permutation(len(pairs))
    chosen = [pairs[k] for k in order[:2]]
    if len(chosen) == 1:  # two objects only: describe the pair from both sides
        chosen.append(chosen[0][::-1])
    else:
        chosen = [p[::-1] if rng.random() < 0.5 else p for p in chosen]
    captions = []
    for i, j in chosen:
        template = int(rng.choice(len(CAPTION_TEMPLATES), p=TEMPLATE_PROBS))
        rel = spatial_relation(norm_bb[i], norm_bb[j])
        captions.append(render_caption(template, scene_objects[i], scene_objects[j], rel))
    return captions


def make_scene(
    rng: np.random.Generator, image_id: str, prototypes: tuple[np.ndarray, np.ndarray, np.ndarray],
    noise_std: float
) -> DemoScene:
    """Draw one scene: objects and background in a shuffled region order, plus captions."""
    p_shape, p_colour, p_stuff = prototypes
    img_dim = p_shape.shape[1]
    n_obj, n_stuff = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    codes = rng.choice(len(DEMO_SHAPES) * len(DEMO_COLOURS), size=n_obj, replace=False)
    objects = [(int(k) // len(DEMO_COLOURS), int(k) % len(DEMO_COLOURS)) for k in codes]
    obj_boxes = _object_boxes(rng, [s for s, _ in objects])  # [n_obj, 6]
    stuff_boxes = _random_boxes(rng, n_stuff, 0.05, 0.5)  # [n_stuff, 6]
    boxes = np.concatenate([obj_boxes, _overlapping_boxes(rng, obj_boxes), stuff_boxes])  # [n, 6]
    n = 2 * n_obj + n_stuff
    obj_signal = np.stack([p_shape[s] + p_colour[c] for s, c in objects])  # [n_obj, img_dim]
    # Background: its band's prototype at the scale of an object's P_s + P_c.
    stuff_signal = p_stuff[stuff_band(stuff_boxes)] * np.sqrt(2.0)  # [n_stuff, img_dim]
    signal = np.concatenate([obj_signal, obj_signal, stuff_signal])  # [n, img_dim]
    feats = signal + noise_std * rng.standard_normal((n, img_dim))  # [n, img_dim]
    conf = np.concatenate([rng.uniform(0.6, 1.0, n_obj), rng.uniform(0.3, 0.6, n_obj),
                           rng.uniform(0.05, 0.3, n_stuff)])
    classes = np.array([1 + s for s, _ in objects] * 2 + [0] * n_stuff)
    soft = _soft_labels(rng, classes)
    # Captions describe each object's more confident proposal (its twin sits close by).
    captions = _pick_captions(rng, objects, obj_boxes)
    perm = rng.permutation(n)  # a detector's region order says nothing about the caption
    region_objects = [objects[k % n_obj] if k < 2 * n_obj else None for k in perm]
    norm_bb = boxes[perm]
    return DemoScene(
        image_id=image_id,
        objects=region_objects,
        features=feats[perm].astype(np.float16),
        norm_bb=norm_bb,
        conf=conf[perm].astype(np.float32),
        soft_labels=soft[perm],
        captions=captions,
    )


def generate_scenes(
    split: str, n_scenes: int, *, seed: int = 0, img_dim: int = 64, noise_std: float = DEFAULT_NOISE_STD
) -> Iterator[DemoScene]:
    """The scenes of `split` ('train' or 'val'), each split from its own seed stream."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAM)}, got {split!r}")
    prototypes = demo_prototypes(seed, img_dim)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[_SPLIT_STREAM[split]])
    for i in range(n_scenes):
        yield make_scene(rng, f"{split}-scene-{i:06d}", prototypes, noise_std)


def check_demo_args(n_train_scenes: int, n_val_scenes: int, scenes_per_shard: int, img_dim: int,
                    noise_std: float) -> None:
    """ValueError for arguments no demo writer accepts."""
    if n_train_scenes < 1 or n_val_scenes < 1:
        raise ValueError(f"need at least one scene per split, got train={n_train_scenes}, val={n_val_scenes}")
    if scenes_per_shard < 1 or img_dim < 1 or noise_std < 0:
        raise ValueError("scenes_per_shard and img_dim must be >= 1 and noise_std >= 0")


def _write_split(
    out_dir: Path, split: str, n_scenes: int, scenes_per_shard: int, seed: int, img_dim: int, noise_std: float,
    to_samples: Callable[[DemoScene], list[dict]], meta: dict, fmt: str,
) -> dict:
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shard_paths, counts, batch = [], [], []
    scenes = generate_scenes(split, n_scenes, seed=seed, img_dim=img_dim, noise_std=noise_std)
    for k, scene in enumerate(scenes, start=1):
        batch.extend(to_samples(scene))
        if k % scenes_per_shard == 0 or k == n_scenes:
            path = split_dir / f"shard-{len(shard_paths):06d}.tar"
            counts.append(write_shard(path, batch))
            shard_paths.append(path)
            batch = []
    manifest = write_manifest(split_dir, shard_paths, meta, counts, fmt=fmt)
    return {
        "scenes": n_scenes,
        "samples": manifest["num_samples"],
        "shards": len(shard_paths),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "manifest": str(split_dir / "manifest.json"),
    }


def write_scene_shards(
    out_dir: str | Path, *, seed: int, n_train_scenes: int, n_val_scenes: int, img_dim: int, scenes_per_shard: int,
    noise_std: float, to_samples: Callable[[DemoScene], list[dict]], split_meta: Callable[[str, int], dict],
    fmt: str, kind: dict,
) -> dict:
    """Write `out_dir/train/` and `out_dir/val/`: each scene through `to_samples`, `scenes_per_shard`
    scenes per shard, a manifest of format `fmt` with `split_meta(split, n_scenes)`; return a summary
    (`kind` names what the samples hold)."""
    check_demo_args(n_train_scenes, n_val_scenes, scenes_per_shard, img_dim, noise_std)
    out = Path(out_dir)
    splits = {
        split: _write_split(out, split, n, scenes_per_shard, seed, img_dim, noise_std, to_samples,
                            split_meta(split, n), fmt)
        for split, n in (("train", n_train_scenes), ("val", n_val_scenes))
    }
    return {
        "out_dir": str(out),
        "seed": seed,
        **kind,
        "num_samples": sum(s["samples"] for s in splits.values()),
        "num_shards": sum(s["shards"] for s in splits.values()),
        "bytes": sum(s["bytes"] for s in splits.values()),
        **splits,
    }


def caption_samples(scene, payload: dict) -> list[dict]:
    """One shard sample per (scene, caption) pair, each holding `payload` (the scene's encoded
    regions or picture: shared by its captions, encoded once)."""
    samples = []
    for c, caption in enumerate(scene.captions):
        key = f"{scene.image_id}-{c}"
        meta = {"image_id": scene.image_id, "caption": caption, "caption_id": key}
        samples.append({"__key__": key, "json": meta, **payload})
    return samples
