"""Region shards with UNITER-base's shapes, for `vlpt bench train` on a GPU.

The demo scenes hold 5-11 regions of 64-d features and ~10-word captions: too small to say
anything about a 768-wide encoder's throughput. These samples carry what UNITER reads from
its detector (36 regions of 2048-d fp16 features, 1601-way soft labels: the mean of UNITER's
10-100 confident boxes on COCO) and ~20-piece captions (two demo captions joined), with a
28,996-token vocabulary (bert-base-cased's size: the demo words plus filler pieces) so the
MLM decoder costs what it costs on real data. Random values: throughput only, no learning.

    python benchmarks/uniter_shape_data.py --out /tmp/uniter_shapes --samples 2048
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from data.demo_scenes import all_demo_captions
from data.shards import FORMAT, write_manifest, write_shard

BERT_BASE_CASED_VOCAB = 28996
IMG_DIM, LABEL_DIM = 2048, 1601
DEMO_VOCAB = Path(__file__).resolve().parents[1] / "data/vocab/demo-vocab.txt"


def write_vocab(path: Path, size: int = BERT_BASE_CASED_VOCAB) -> Path:
    """The demo vocabulary padded with never-seen pieces to `size` lines."""
    words = DEMO_VOCAB.read_text().splitlines()
    path.write_text("\n".join(words + [f"##fill{k}" for k in range(size - len(words))]) + "\n")
    return path


def region_arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    xy = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1)  # [n, 2 corners, (x, y)]
    x1, y1, x2, y2 = xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]
    logits = rng.standard_normal((n, LABEL_DIM))
    soft = np.exp(logits - logits.max(1, keepdims=True))
    return {
        "features": rng.standard_normal((n, IMG_DIM)).astype(np.float16),
        "norm_bb": np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], 1).astype(np.float32),
        "conf": rng.uniform(0.2, 1.0, n).astype(np.float32),
        "soft_labels": (soft / soft.sum(1, keepdims=True)).astype(np.float16),
    }


def write_split(out: Path, n_samples: int, n_regions: int, seed: int, per_shard: int = 256) -> None:
    rng = np.random.default_rng(seed)
    captions = list(itertools.islice(all_demo_captions(), 4096))
    out.mkdir(parents=True, exist_ok=True)
    paths, counts = [], []
    for start in range(0, n_samples, per_shard):
        samples = []
        for i in range(start, min(start + per_shard, n_samples)):
            a, b = rng.integers(len(captions), size=2)
            meta = {"image_id": f"img{seed}-{i}", "caption": f"{captions[a]} and {captions[b]}",
                    "caption_id": f"img{seed}-{i}"}
            samples.append({"__key__": f"img{seed}-{i}", "json": meta, "npz": region_arrays(rng, n_regions)})
        paths.append(out / f"shard-{len(paths):06d}.tar")
        counts.append(write_shard(paths[-1], samples))
    write_manifest(out, paths, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM, "generator": "uniter-shapes"},
                   counts, fmt=FORMAT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--regions", type=int, default=36)
    args = p.parse_args()
    out = Path(args.out)
    write_split(out / "train", args.samples, args.regions, seed=0)
    write_split(out / "val", 256, args.regions, seed=1)
    print(f"wrote {args.samples} + 256 samples, {args.regions} regions each; vocab {write_vocab(out / 'vocab.txt')}")


if __name__ == "__main__":
    main()
