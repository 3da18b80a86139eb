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
from data.shards import FORMAT, read_manifest, read_region_npz
from data.storage import check_regular_file


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
