"""The picture store ALBEF's task-folder tasks join their examples to (data/tasks/features.py, `PictureStore`):
pictures indexed once by image id, decoded on demand within the pixel budget; unknown, undecodable or
oversized pictures are reasons, never exceptions, and a bad one is remembered."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data.limits import DecodeLimits
from data.shards import PIXEL_FORMAT, write_manifest, write_shard
from data.tasks.features import PictureStore


def png(side: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, image_id: str, picture: bytes) -> dict:
    return {"__key__": key, "json": json.dumps({"image_id": image_id, "captions": ["a red cube"]}), "png": picture}


@pytest.fixture
def folder(tmp_path):
    samples = [sample("s0", "img-a", png(8, 10)), sample("s1", "img-b", b"not a picture"),
               sample("s2", "img-big", png(64, 20)), sample("s3", "img-a", png(8, 99))]  # a duplicate id
    count = write_shard(tmp_path / "pics" / "shard-0.tar", samples)
    write_manifest(tmp_path / "pics", [tmp_path / "pics" / "shard-0.tar"], {"split": "val"}, [count],
                   fmt=PIXEL_FORMAT, pairs=[count])
    return str(tmp_path / "pics")


def test_pictures_by_image_id_and_the_reasons_of_bad_ones(folder):
    store = PictureStore([folder], DecodeLimits(max_image_pixels=32 * 32), cache_images=1)
    assert len(store) == 3 and "img-a" in store
    image, reason = store.get("img-a")
    assert reason is None and image.size == (8, 8) and image.getpixel((0, 0)) == (10, 10, 10)  # the first sample
    assert store.get("img-b") == (None, "bad_image")
    assert store.get("img-big") == (None, "image_too_large")  # its header says 64 x 64: never decoded
    assert store.get("img-b") == (None, "bad_image") and "img-b" not in store  # remembered as bad
    assert store.get("nope") == (None, "unknown_image")
    assert store.get("img-a")[0].getpixel((0, 0)) == (10, 10, 10)  # decoded again after the cache dropped it


def test_remote_and_region_folders_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="copy the picture shards to a local folder"):
        PictureStore(["s3://bucket/pictures"])
    region_folder = tmp_path / "regions"
    region_folder.mkdir()
    write_manifest(region_folder, [], {"img_dim": 4, "label_dim": 2})
    with pytest.raises(ValueError, match="format"):
        PictureStore([str(region_folder)])
