"""Region features of downstream examples, joined by image id (docs/downstream.md, "Features").

A `FeatureStore` indexes the region shard folders a run names (`finetune.features`): it reads each
shard's member headers once, remembers where each image's `.npz` lies (shard, byte offset, size),
and decodes an image's regions on demand with the same checks as pretraining (data/shards.py), so
features are stored once however many examples refer to them. Bad or duplicate images are counted,
never raised.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data.limits import DecodeLimits
from data.shards import FORMAT, decode_regions, read_manifest, split_member_name
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


def _index_shard(path: str, skipped: Counter) -> dict[str, _Member]:
    """image_id -> where its first `.npz` lies in one shard; a damaged shard counts "corrupt_tar"
    and keeps what was indexed before the damage."""
    ids: dict[str, str] = {}  # sample key -> image id
    npz: dict[str, _Member] = {}  # sample key -> npz member
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
                elif ext == "npz":
                    npz[key] = _Member(path, member.offset_data, member.size)
    except FileNotFoundError:
        skipped["missing_shard"] += 1
    except NotARegularFile:
        skipped["not_a_file"] += 1
    except (tarfile.TarError, OSError, EOFError):
        skipped["corrupt_tar"] += 1
    found: dict[str, _Member] = {}
    for key, image_id in ids.items():
        if key in npz:
            found.setdefault(image_id, npz[key])
    return found


class FeatureStore:
    """Regions by image id over local region shard folders (`vlpt-regions-v1`).

    Indexing reads member headers and the small `.json` records, not the features; an image
    found in several samples (one per caption in pretraining shards) is indexed once. Decoded
    images are kept in an LRU cache of `cache_images`; an image that fails to decode is
    remembered as bad with its reason.
    """

    def __init__(self, folders: Sequence[str], img_dim: int, limits: DecodeLimits = DecodeLimits(),
                 cache_images: int = 4096, allow_outside: bool = False) -> None:
        self.img_dim, self.limits, self.cache_images = img_dim, limits, cache_images
        self.index: dict[str, _Member] = {}
        self.skipped: Counter = Counter()
        self.bad: dict[str, str] = {}
        self._cache: OrderedDict[str, Regions] = OrderedDict()
        for folder in folders:
            self._add_folder(folder, allow_outside)

    def _add_folder(self, folder: str, allow_outside: bool) -> None:
        if "://" in folder:
            raise ValueError(f"finetune.features: {folder} is remote; downstream features are read by image id "
                             "with random access, so copy the region shards to a local folder and name that")
        manifest = read_manifest(folder, FORMAT, allow_outside=allow_outside)
        if manifest.img_dim != self.img_dim:
            raise ValueError(f"finetune.features: {folder} has {manifest.img_dim}-d region features but "
                             f"model.img_dim={self.img_dim}")
        for shard in manifest.shards:
            for image_id, member in _index_shard(shard, self.skipped).items():
                self.index.setdefault(image_id, member)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index and image_id not in self.bad

    def __len__(self) -> int:
        return len(self.index)

    def get(self, image_id: str) -> tuple[Optional[Regions], Optional[str]]:
        """(regions, None), or (None, reason): "unknown_image", or why its features are unusable."""
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id], None
        if image_id in self.bad:
            return None, self.bad[image_id]
        member = self.index.get(image_id)
        if member is None:
            return None, "unknown_image"
        regions, reason = self._decode(image_id, member)
        if reason:
            self.bad[image_id] = reason
            return None, reason
        self._cache[image_id] = regions
        if len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return regions, None

    def _decode(self, image_id: str, member: _Member) -> tuple[Optional[Regions], Optional[str]]:
        if member.size > self.limits.max_member_bytes:
            return None, "npz_too_large"
        try:
            with open_regular_file(member.shard, member.offset) as f:  # never a FIFO swapped in since indexing
                data = f.read(member.size)
        except OSError:
            return None, "missing_npz"
        f32, reason = decode_regions(data, self.img_dim, 0, self.limits)
        if reason:
            return None, reason
        bb = f32["norm_bb"]  # [n, 6]
        img_pos = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)  # [n, 7], UNITER appends w*h
        return Regions(image_id, f32["features"], img_pos), None
