"""Streams: world-size invariance, exact resume by position, task draws."""
import functools
from collections import Counter

import numpy as np
import pytest

from data.collate import collate_itm, collate_mlm
from data.loader import ResumableTaskLoader, StreamSpec, TaskBatches, validation_batches
from data.shards import read_manifest
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from trainer.steps import draw_task

VOCAB = str(REPO / "data/vocab/demo-vocab.txt")


def make_loader(demo_data, task, n_streams, streams, state=None, batch=8, workers=0):
    tok = load_tokenizer(VOCAB)
    shards = tuple(read_manifest(demo_data / "train").shards)
    spec = StreamSpec(shards=shards, task=task, seed=3, n_streams=n_streams, batch_size=batch,
                      shuffle_buffer=16, max_txt_len=60, img_dim=16)
    collate = (functools.partial(collate_mlm, tok=tok) if task == "mlm"
               else functools.partial(collate_itm, tok=tok))
    return ResumableTaskLoader(TaskBatches(spec, tok, collate, streams, state), workers, seed=3)


def fingerprint(batch):
    return (tuple(batch["keys"]), batch["input_ids"].numpy().tobytes(),
            batch.get("itm_targets", batch.get("mlm_targets")).numpy().tobytes())


@pytest.mark.parametrize("task", ["mlm", "itm"])
def test_one_rank_two_accum_equals_two_ranks(demo_data, task):
    one = make_loader(demo_data, task, 2, [0, 1])
    r0, r1 = make_loader(demo_data, task, 2, [0]), make_loader(demo_data, task, 2, [1])
    for _ in range(12):  # crosses an epoch boundary of the smaller stream
        assert fingerprint(one.next()) == fingerprint(r0.next())
        assert fingerprint(one.next()) == fingerprint(r1.next())


def test_streams_partition_an_epoch(demo_data):
    loaders = [make_loader(demo_data, "mlm", 3, [s], batch=4) for s in range(3)]
    seen = Counter()
    for s, loader in enumerate(loaders):
        while True:
            b = loader.next()
            if b["epoch"] > 0:
                break
            seen.update(b["keys"])
    total = read_manifest(demo_data / "train").num_samples
    assert max(seen.values()) == 1  # nothing repeated inside an epoch
    assert sum(seen.values()) > total * 0.8  # only each stream's last partial batch is dropped


def test_resume_from_positions_replays_exactly(demo_data):
    ref = make_loader(demo_data, "itm", 2, [0, 1])
    stream = [fingerprint(ref.next()) for _ in range(20)]
    first = make_loader(demo_data, "itm", 2, [0, 1])
    for _ in range(8):  # four optimizer steps of 2 micro-batches
        first.next()
    state = {int(s): tuple(p) for s, p in first.state_dict().items()}
    resumed = make_loader(demo_data, "itm", 2, [0, 1], state=state)
    assert [fingerprint(resumed.next()) for _ in range(12)] == stream[8:]


def test_workers_keep_stream_order(demo_data):
    plain = make_loader(demo_data, "mlm", 2, [0, 1])
    workers = make_loader(demo_data, "mlm", 2, [0, 1], workers=2)
    assert workers.num_workers == 2
    for _ in range(6):
        assert fingerprint(plain.next()) == fingerprint(workers.next())


def test_validation_split_is_exact_and_equal(demo_data):
    tok = load_tokenizer(VOCAB)
    shards = read_manifest(demo_data / "val").shards
    collate = functools.partial(collate_itm, tok=tok)
    per_rank = [list(validation_batches(shards, tok, collate, task="itm", seed=1, rank=r, world=2,
                                        batch_size=7, max_txt_len=60, img_dim=16)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    keys = [k for batches in per_rank for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys))
    n = read_manifest(demo_data / "val").num_samples
    assert len(keys) == n // 2 * 2


def test_task_draw_is_deterministic_and_follows_ratios():
    ratios = {"mlm": 8, "itm": 6}
    a = [draw_task(5, s, ratios) for s in range(4000)]
    assert a == [draw_task(5, s, ratios) for s in range(4000)]
    frac = a.count("mlm") / len(a)
    assert abs(frac - 8 / 14) < 0.03
    assert a != [draw_task(6, s, ratios) for s in range(4000)]


def test_too_small_stream_is_an_actionable_error(demo_data):
    loader = make_loader(demo_data, "mlm", 1, [0], batch=10_000)
    with pytest.raises(ValueError, match="micro_batch_size"):
        loader.next()
