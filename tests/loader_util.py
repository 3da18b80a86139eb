"""Small builders for loader tests: sized shard sets, specs and loaders (tests only)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

from data.collate import collate_itm, collate_mlm
from data.demo_scenes import LABEL_DIM
from data.loader import ResumableTaskLoader, StreamSpec, TaskBatches, single_dataset
from data.shards import read_manifest, write_manifest, write_shard
from data.sources import DatasetShards
from data.tokenizer import load_tokenizer
from tests.bad_input_data import IMG_DIM, good_samples
from tests.conftest import REPO

VOCAB = str(REPO / "data/vocab/demo-vocab.txt")
UNEQUAL_SIZES = (5, 40, 13, 27, 8, 61, 19)


def tokenizer():
    return load_tokenizer(VOCAB)


def write_sized_shards(directory: Path, sizes: Sequence[int], key_prefix: str = "") -> Path:
    """Shards of the given sample counts (distinct keys, prefixed) plus a manifest."""
    pool = good_samples(sum(sizes))
    paths, at = [], 0
    for i, n in enumerate(sizes):
        samples = [{**s, "__key__": f"{key_prefix}{s['__key__']}"} for s in pool[at:at + n]]
        paths.append(directory / f"shard-{i:06d}.tar")
        write_shard(paths[-1], samples)
        at += n
    write_manifest(directory, paths, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM})
    return directory


def dataset_of(directory, name: str = "train", weight: float = 1.0, s3=None) -> DatasetShards:
    m = read_manifest(directory, s3=s3)
    return DatasetShards(name, tuple(m.shards), tuple(m.counts), weight)


def spec_for(directory=None, *, datasets: Optional[tuple] = None, task: str = "mlm", **kw) -> StreamSpec:
    if datasets is None:
        m = read_manifest(directory, s3=kw.get("s3"))
        datasets = single_dataset("train", m.shards, m.counts)
    base = dict(task=task, seed=3, n_streams=1, batch_size=8, shuffle_buffer=16, max_txt_len=60,
                img_dim=IMG_DIM)
    base.update(kw)
    return StreamSpec(datasets=datasets, **base)


def make_loader(spec: StreamSpec, streams, state=None, workers: int = 0, tok=None) -> ResumableTaskLoader:
    tok = tok or tokenizer()
    collate = (functools.partial(collate_itm, tok=tok) if spec.task.endswith("itm")
               else functools.partial(collate_mlm, tok=tok))
    return ResumableTaskLoader(TaskBatches(spec, tok, collate, list(streams), state), workers, seed=3)


def fingerprint(batch) -> tuple:
    return (tuple(batch["keys"]), batch["input_ids"].numpy().tobytes(),
            batch.get("itm_targets", batch.get("mlm_targets")).numpy().tobytes())


def take(loader: ResumableTaskLoader, n: int) -> list[tuple]:
    return [fingerprint(loader.next()) for _ in range(n)]
