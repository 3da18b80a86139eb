"""The held-out split is read with the training policy: damaged or vanished shards and bad
samples are skipped and counted, never fatal."""
import functools
import shutil
from pathlib import Path

import pytest

from data.collate import collate_itm
from data.demo_scenes import LABEL_DIM
from data.loader import validation_batches
from data.shards import PIXEL_FORMAT, read_manifest, write_manifest, write_shard
from tests.bad_input_data import IMG_DIM, bad_sample, good_samples, truncate_mid_member
from tests.loader_util import tokenizer
from trainer.retrieval import load_retrieval_set


def damaged_val_split(directory):
    """Three shards: one truncated after 3 of 6 samples, one with a bad sample, one removed."""
    paths = [directory / f"shard-{i:06d}.tar" for i in range(3)]
    pool = good_samples(16, split="val")
    write_shard(paths[0], pool[:6])
    write_shard(paths[1], pool[6:10] + [bad_sample("nonfinite_features", "bad-0")])
    write_shard(paths[2], pool[10:16])
    write_manifest(directory, paths, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts=[6, 5, 6])
    assert truncate_mid_member(paths[0], 2 * 3 + 1) == 3
    manifest = read_manifest(directory)
    paths[2].unlink()
    return manifest


def test_validation_skips_and_counts_damage(tmp_path):
    manifest = damaged_val_split(tmp_path)
    tok = tokenizer()
    per_rank_skips, per_rank_items = [], []
    for rank in range(2):
        skipped: dict = {}
        batches = list(validation_batches(manifest.shards, tok, functools.partial(collate_itm, tok=tok),
                                          task="itm", seed=1, rank=rank, world=2, batch_size=4,
                                          max_txt_len=60, img_dim=IMG_DIM, skipped=skipped))
        per_rank_skips.append(skipped)
        per_rank_items.append(sum(b["n_items"] for b in batches))
    # 8 readable samples (3 + 5) dealt out rank-strided; the bad one (the 8th) is rank 1's. Shard-level
    # damage is counted by rank 0 alone, so the ranks' counts add up to the split's.
    assert per_rank_items == [4, 3]
    total = {}
    for s in per_rank_skips:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    assert total == {"corrupt_tar": 1, "missing_shard": 1, "nonfinite_features": 1}


def test_retrieval_set_skips_and_counts_damage(tmp_path, pixel_data):
    shutil.copytree(pixel_data / "val", tmp_path / "val")
    manifest = read_manifest(tmp_path / "val", PIXEL_FORMAT)
    readable = truncate_mid_member(Path(manifest.shards[-1]), 2 * 1 + 1)  # inside sample 1
    skipped: dict = {}
    data = load_retrieval_set(manifest.shards, tokenizer(), 23, skipped=skipped)
    assert skipped == {"corrupt_tar": 1}
    pictures = manifest.num_samples - (manifest.counts[-1] - readable)
    assert len(data.images) == pictures and len(data.input_ids) == 2 * pictures  # 2 captions per demo scene


def test_unreadable_held_out_data_skips_the_validation_with_one_line():
    import trainer.run as run_module
    from trainer.config import Config

    class Recipe:
        """The recipe's held-out reading fails as `error` does."""

        def __init__(self, error: Exception) -> None:
            self.error = error

        def val_splits(self, tok, skipped):
            raise self.error

    class Lines:
        def __init__(self):
            self.lines = []

        def write(self, line):
            self.lines.append(line)

    progress = Lines()
    unreachable = Recipe(IOError("s3://bucket/val/manifest.json: giving up after 10 retries in 45s"))
    run = run_module.Run(Config(), unreachable, None, None, None, None, "")
    run.state, run.progress = run_module.RunState(step=7), progress
    assert run.validate() == {}
    assert len(progress.lines) == 1 and "validation @ step 7 skipped" in progress.lines[0]
    assert "giving up" in progress.lines[0]

    run.recipe = Recipe(KeyError("a bug is not a data error"))
    run.state.step = 8
    with pytest.raises(KeyError):
        run.validate()
