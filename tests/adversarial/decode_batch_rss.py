"""Decode and collate one micro-batch of pictures and one of region features, as a training
reader does, in a fresh process; print its peak RSS and the skips as JSON (tests only).

    python -m tests.adversarial.decode_batch_rss PIXEL_SHARD REGION_SHARD
"""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np

from data.collate import collate_mlm
from data.collate_albef import collate_albef
from data.config import DataConfig
from data.pixels import PixelConfig
from data.shards import decode_pixel_sample, decode_region_sample, iter_shard
from data.tokenizer import load_tokenizer
from tests.adversarial.conftest import own_peak_rss_kb
from tests.bad_input_data import IMG_DIM
from tests.conftest import REPO


def main(pixel_shard: str, region_shard: str) -> None:
    tok = load_tokenizer(REPO / "data/vocab/demo-vocab.txt")
    limits = DataConfig().decode_limits("fp32")
    skipped: Counter = Counter()
    pictures, regions = [], []
    for raw in iter_shard(pixel_shard):
        sample, reason = decode_pixel_sample(raw, tok, limits)
        pictures.append(sample) if sample else skipped.update([reason])
    for raw in iter_shard(region_shard):
        sample, reason = decode_region_sample(raw, tok, 60, IMG_DIM, limits=limits)
        regions.append(sample) if sample else skipped.update([reason])
    rng = np.random.default_rng(0)
    collate_albef(pictures, rng, tok, PixelConfig(image_size=32), max_txt_len=23)
    collate_mlm(regions, rng, tok=tok)
    print(json.dumps({"peak_rss_kb": own_peak_rss_kb(),
                      "skipped": dict(skipped), "pictures": len(pictures), "regions": len(regions)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
