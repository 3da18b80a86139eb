"""The pixel demo draws what the captions say: each object's colour in its box, the
relations between objects as in the region demo."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.demo_scenes import DEMO_COLOURS, DEMO_SHAPES, generate_scenes, spatial_relation
from data.demo_pixels import BAND_RGB, COLOUR_RGB, draw_shape, object_boxes, render_scene

SIZE = 128


def colour_centroid(pixels: np.ndarray, rgb) -> np.ndarray:
    ys, xs = np.nonzero((pixels == np.array(rgb)).all(-1))
    return np.array([xs.mean(), ys.mean()]) / SIZE


def overlaps(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def test_objects_show_their_colour_where_their_box_is_and_relations_hold():
    checked = 0
    for scene in generate_scenes("train", 40, img_dim=16):
        pixels = np.asarray(render_scene(scene, SIZE))
        assert pixels.shape == (SIZE, SIZE, 3)
        objects = object_boxes(scene)
        assert len(objects) == sum(o is not None for o in scene.objects) // 2  # each object drawn once
        colours = [c for (_, c), _ in objects]
        for k, ((shape, colour), bb) in enumerate(objects):
            others = [b for j, (_, b) in enumerate(objects) if j != k]
            if colours.count(colour) > 1 or any(overlaps(bb, b) for b in others):
                continue  # an occluded or same-coloured object: its colour alone does not place it
            rgb = COLOUR_RGB[DEMO_COLOURS[colour]]
            centre = colour_centroid(pixels, rgb)
            x1, y1, x2, y2 = bb[:4]
            assert x1 - 0.02 <= centre[0] <= x2 + 0.02 and y1 - 0.02 <= centre[1] <= y2 + 0.02, DEMO_SHAPES[shape]
            checked += 1
        for i, ((_, ca), a) in enumerate(objects):  # left/right/above/below from the drawn colours
            for (_, cb), b in objects[i + 1:]:
                if colours.count(ca) > 1 or colours.count(cb) > 1 or overlaps(a, b):
                    continue
                rel = spatial_relation(a, b)
                pa = colour_centroid(pixels, COLOUR_RGB[DEMO_COLOURS[ca]])
                pb = colour_centroid(pixels, COLOUR_RGB[DEMO_COLOURS[cb]])
                if rel == "left of":
                    assert pa[0] < pb[0]
                elif rel == "right of":
                    assert pa[0] > pb[0]
                elif rel == "above":
                    assert pa[1] < pb[1]
                elif rel == "below":
                    assert pa[1] > pb[1]
    assert checked >= 40


def test_background_bands_use_no_object_colour():
    assert not set(BAND_RGB) & set(COLOUR_RGB.values())


@pytest.mark.parametrize("shape", DEMO_SHAPES)
def test_every_shape_draws_inside_its_box(shape):
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    draw_shape(ImageDraw.Draw(img), shape, (16.0, 8.0, 48.0, 56.0), (200, 100, 50))
    drawn = np.asarray(img).any(-1)
    ys, xs = np.nonzero(drawn)
    assert drawn.sum() > 40 and xs.min() >= 16 and xs.max() <= 48 and ys.min() >= 8 and ys.max() <= 56


def test_shapes_differ_from_each_other():
    masks = set()
    for shape in DEMO_SHAPES:
        img = Image.new("RGB", (64, 64), (0, 0, 0))
        draw_shape(ImageDraw.Draw(img), shape, (8.0, 8.0, 56.0, 56.0), (255, 255, 255))
        masks.add(np.asarray(img).tobytes())
    assert len(masks) == len(DEMO_SHAPES)


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown demo shape"):
        draw_shape(ImageDraw.Draw(Image.new("RGB", (8, 8))), "torus", (0, 0, 8, 8), (1, 2, 3))


def test_pixel_demo_shards_hold_the_region_demos_captions_as_pictures(tmp_path):
    import json

    from data.demo import write_demo_dataset
    from data.demo_pixels import write_demo_pixels
    from data.pixels import decode_image
    from data.limits import DEFAULT_MAX_CAPTIONS
    from data.shards import PIXEL_FORMAT, iter_pixel_pairs, iter_shard, read_manifest, verify_manifest

    small = dict(seed=3, n_train_scenes=12, n_val_scenes=4, img_dim=16, scenes_per_shard=5)
    summary = write_demo_pixels(tmp_path / "px", image_size=64, **small)
    write_demo_dataset(tmp_path / "regions", **small)
    assert summary["image_size"] == 64 and summary["train"]["shards"] == 3
    assert (summary["train"]["samples"], summary["train"]["pairs"]) == (12, 24)  # a picture per scene, 2 captions
    for split in ("train", "val"):
        manifest = read_manifest(tmp_path / "px" / split, expected_format=PIXEL_FORMAT)
        assert verify_manifest(manifest) == [] and manifest.meta["image_size"] == 64
        regions = read_manifest(tmp_path / "regions" / split)
        raws = [r for shard in manifest.shards for r in iter_shard(shard)]
        px = [(json.loads(r["json"]), r["png"]) for r in raws]
        rg = [json.loads(r["json"]) for shard in regions.shards for r in iter_shard(shard)]
        pairs = [(m["image_id"], m["captions"][r["__pair__"]], m["caption_ids"][r["__pair__"]])
                 for r in iter_pixel_pairs(raws, DEFAULT_MAX_CAPTIONS) for m in [json.loads(r["json"])]]
        assert pairs == [(m["image_id"], m["caption"], m["caption_id"]) for m in rg]  # the same pairs, in order
        assert manifest.units == manifest.pairs and len(manifest.pairs) == len(manifest.shards)
        assert sum(manifest.pairs) == len(rg) and manifest.num_samples == len(px)
        for meta, png in px:
            img = decode_image(png)
            assert img.size == (64, 64)
    again = write_demo_pixels(tmp_path / "px2", image_size=64, **small)
    assert again["train"]["bytes"] == summary["train"]["bytes"]
    a = (tmp_path / "px" / "train" / "shard-000000.tar").read_bytes()
    assert a == (tmp_path / "px2" / "train" / "shard-000000.tar").read_bytes()  # deterministic
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        write_demo_pixels(tmp_path / "bad", image_size=8, **small)


def test_demo_data_cli_pixels(tmp_path, capsys):
    from vlpt.cli import main

    out = tmp_path / "pixels"
    assert main(["demo-data", "--pixels", "--image-size", "32", "--scenes", "4", "--val-scenes", "2",
                 "--out", str(out)]) == 0
    assert (out / "train" / "manifest.json").is_file() and "'image_size': 32" in capsys.readouterr().out
    assert main(["demo-data", "--pixels", "--image-size", "8", "--out", str(tmp_path / "b")]) == 2
    assert "image_size must be at least 16" in capsys.readouterr().err
