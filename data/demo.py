"""The demo scenes (data/demo_scenes.py) as region-feature shards (vlpt-regions-v1), for UNITER:
per region a detector-like feature, its box, confidence and soft class labels.

`vlpt demo-data` writes them; `vlpt demo-data --pixels` writes the same scenes and
captions as pictures instead (data/demo_pixels.py).
"""
from __future__ import annotations

from pathlib import Path

from data.demo_scenes import DEFAULT_NOISE_STD, LABEL_DIM, DemoScene, caption_samples, write_scene_shards
from data.shards import FORMAT, encode_npz


def scene_samples(scene: DemoScene) -> list[dict]:
    """One shard sample per (scene, caption) pair, in the vlpt-regions-v1 schema."""
    payload = {"npz": encode_npz({"features": scene.features, "norm_bb": scene.norm_bb, "conf": scene.conf,
                                  "soft_labels": scene.soft_labels})}
    return caption_samples(scene, payload)


def write_demo_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_scenes: int = 2000,
    n_val_scenes: int = 250,
    img_dim: int = 64,
    scenes_per_shard: int = 250,
    noise_std: float = DEFAULT_NOISE_STD,
) -> dict:
    """Write `out_dir/train/` and `out_dir/val/` (region shards + manifest.json); return a summary.

    Same arguments give byte-identical shards. Val scenes come from a separate
    seed stream, so they are held out from train.
    """
    def split_meta(split: str, n_scenes: int) -> dict:
        return {"img_dim": img_dim, "label_dim": LABEL_DIM, "split": split, "num_scenes": n_scenes,
                "generator": "vlpt-demo", "seed": seed, "noise_std": noise_std}

    return write_scene_shards(out_dir, seed=seed, n_train_scenes=n_train_scenes, n_val_scenes=n_val_scenes,
                              img_dim=img_dim, scenes_per_shard=scenes_per_shard, noise_std=noise_std,
                              to_samples=scene_samples, split_meta=split_meta, fmt=FORMAT,
                              kind={"img_dim": img_dim, "label_dim": LABEL_DIM})
