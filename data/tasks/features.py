"""Region features (UNITER) or pictures (ALBEF) of downstream examples, joined by image id
(docs/downstream.md, "Features").

A `FeatureStore` indexes the region shard folders a run names (`finetune.features`), a `PictureStore`
picture shard folders: each reads every shard's member headers once, remembers where each image's `.npz`
or picture lies (shard, byte offset, size), and decodes it on demand with the same checks as pretraining
(data/shards.py), so images are stored once however many examples refer to them. Bad or duplicate images
are counted, never raised.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from data.limits import DecodeLimits
from data.shards import FORMAT, IMAGE_EXTENSIONS, PIXEL_FORMATS, decode_regions, read_manifest, split_member_name
from data.storage import NotARegularFile, open_regular_file


@dataclass(frozen=True)
class Regions:
    """One image's regions, ready for collate."""

    image_id: str
    img_feat: np.ndarray
    """[n, img_dim] float32."""
    img_pos: np.ndarray
    """[n, 7] float32: x1, y1, x2, y2, w, h, w*h (normalised to the image)."""

    @property
    def num_bb(self) -> int:
        return int(self.img_feat.shape[0])


@dataclass(frozen=True)
class _Member:
    shard: str
    offset: int
    size: int


MAX_META_BYTES = 1 << 20
"""Largest `.json` member read while indexing (a caption record is well under 1 kB)."""


def _image_id(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Optional[str]:
    if member.size > MAX_META_BYTES:
        return None
    f = tar.extractfile(member)
    try:
        meta = json.loads(f.read().decode("utf-8")) if f is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    image_id = meta.get("image_id") if isinstance(meta, dict) else None
    return image_id if isinstance(image_id, str) and image_id else None


def _index_shard(path: str, skipped: Counter, payload: tuple[str, ...] = ("npz",)) -> dict[str, _Member]:
    """image_id -> where its first payload member (`.npz` regions, or a picture) lies in one shard; a damaged
    shard counts "corrupt_tar" and keeps what was indexed before the damage."""
    ids: dict[str, str] = {}  # sample key -> image id
    data: dict[str, _Member] = {}  # sample key -> payload member
    try:
        with open_regular_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():  # links and devices are never followed
                    continue
                key, ext = split_member_name(member.name)
                if ext == "json":
                    image_id = _image_id(tar, member)
                    if image_id is not None:
                        ids[key] = image_id
                elif ext in payload:
                    data.setdefault(key, _Member(path, member.offset_data, member.size))
    except FileNotFoundError:
        skipped["missing_shard"] += 1
    except NotARegularFile:
        skipped["not_a_file"] += 1
    except (tarfile.TarError, OSError, EOFError):
        skipped["corrupt_tar"] += 1
    found: dict[str, _Member] = {}
    for key, image_id in ids.items():
        if key in data:
            found.setdefault(image_id, data[key])
    return found


class _ImageStore:
    """What is stored of each image, by image id, over local shard folders (a subclass says what and how it
    decodes). Indexing reads member headers and the small `.json` records, not the payloads; an image
    found in several samples is indexed once. Decoded images are kept in an LRU cache of
    `cache_images`; an image that fails to decode is remembered as bad with its reason."""

    payload: tuple[str, ...] = ()
    """The member extensions that hold an image's data."""
    too_large = "member_too_large"
    missing = "missing_member"
    kind = "image"
    """Skip reasons: the member is over `limits.max_member_bytes`; it cannot be read any more."""

    def __init__(self, folders: Sequence[str], limits: DecodeLimits, cache_images: int, allow_outside: bool) -> None:
        self.limits, self.cache_images = limits, cache_images
        self.index: dict[str, _Member] = {}
        self.skipped: Counter = Counter()
        self.bad: dict[str, str] = {}
        self._cache: OrderedDict[str, Any] = OrderedDict()
        for folder in folders:
            if "://" in folder:
                raise ValueError(f"finetune.features: {folder} is remote; downstream {self.kind}s are read by image "
                                 f"id with random access, so copy the {self.kind} shards to a local folder and name that")
            for shard in self._shards(folder, allow_outside):
                for image_id, member in _index_shard(shard, self.skipped, self.payload).items():
                    self.index.setdefault(image_id, member)

    def _shards(self, folder: str, allow_outside: bool) -> list[str]:
        raise NotImplementedError

    def _decode_bytes(self, image_id: str, data: bytes) -> tuple[Any, Optional[str]]:
        raise NotImplementedError

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index and image_id not in self.bad

    def __len__(self) -> int:
        return len(self.index)

    def get(self, image_id: str) -> tuple[Optional[Any], Optional[str]]:
        """(decoded image, None), or (None, reason): "unknown_image", or why its data is unusable."""
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id], None
        if image_id in self.bad:
            return None, self.bad[image_id]
        member = self.index.get(image_id)
        if member is None:
            return None, "unknown_image"
        decoded, reason = self._decode(image_id, member)
        if reason:
            self.bad[image_id] = reason
            return None, reason
        self._cache[image_id] = decoded
        if len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return decoded, None

    def _decode(self, image_id: str, member: _Member) -> tuple[Any, Optional[str]]:
        if member.size > self.limits.max_member_bytes:
            return None, self.too_large
        try:
            with open_regular_file(member.shard, member.offset) as f:  # never a FIFO swapped in since indexing
                data = f.read(member.size)
        except OSError:
            return None, self.missing
        return self._decode_bytes(image_id, data)


class FeatureStore(_ImageStore):
    """Regions by image id over local region shard folders (`vlpt-regions-v1`)."""

    payload = ("npz",)
    too_large, missing, kind = "npz_too_large", "missing_npz", "region"

    def __init__(self, folders: Sequence[str], img_dim: int, limits: DecodeLimits = DecodeLimits(),
                 cache_images: int = 4096, allow_outside: bool = False) -> None:
        self.img_dim = img_dim
        super().__init__(folders, limits, cache_images, allow_outside)

    def _shards(self, folder: str, allow_outside: bool) -> list[str]:
        manifest = read_manifest(folder, FORMAT, allow_outside=allow_outside)
        if manifest.img_dim != self.img_dim:
            raise ValueError(f"finetune.features: {folder} has {manifest.img_dim}-d region features but "
                             f"model.img_dim={self.img_dim}")
        return manifest.shards

    def _decode_bytes(self, image_id: str, data: bytes) -> tuple[Optional[Regions], Optional[str]]:
        f32, reason = decode_regions(data, self.img_dim, 0, self.limits)
        if reason:
            return None, reason
        bb = f32["norm_bb"]  # [n, 6]
        img_pos = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)  # [n, 7], UNITER appends w*h
        return Regions(image_id, f32["features"], img_pos), None


class PictureStore(_ImageStore):
    """Pictures (PIL RGB) by image id over local picture shard folders (`vlpt-pixels-v1/v2`), for ALBEF's
    downstream tasks; decoded with pretraining's budget (`limits.max_image_pixels` before decoding)."""

    payload = IMAGE_EXTENSIONS
    too_large, missing, kind = "image_too_large", "missing_image", "picture"

    def __init__(self, folders: Sequence[str], limits: DecodeLimits = DecodeLimits(), cache_images: int = 4096,
                 allow_outside: bool = False) -> None:
        super().__init__(folders, limits, cache_images, allow_outside)

    def _shards(self, folder: str, allow_outside: bool) -> list[str]:
        return read_manifest(folder, PIXEL_FORMATS, allow_outside=allow_outside).shards

    def _decode_bytes(self, image_id: str, data: bytes) -> tuple[Any, Optional[str]]:
        from data.pixels import ImageTooLargeError, decode_image

        try:
            return decode_image(data, self.limits.max_image_pixels), None
        except ImageTooLargeError:
            return None, "image_too_large"
        except ValueError:
            return None, "bad_image"
