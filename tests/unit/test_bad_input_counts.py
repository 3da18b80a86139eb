"""Bad input in the loader: corrupt shards end quietly and every skip is counted, per batch."""
import functools
import logging
import tarfile
from collections import Counter

import pytest

from data.collate import collate_mlm
from data.loader import ResumableTaskLoader, StreamReader, StreamSpec, TaskBatches
from data.shards import SKIP_REASONS, iter_shard, read_manifest, write_shard
from data.tokenizer import load_tokenizer
from tests.bad_input_data import (bad_sample, epoch_shard_order, good_samples, truncate_mid_member,
                                  write_bad_dataset)
from tests.conftest import REPO

VOCAB = str(REPO / "data/vocab/demo-vocab.txt")
SEED, TASK = 7, "mlm"


def spec_for(shards, batch=8, n_streams=1):
    return StreamSpec(shards=tuple(shards), task=TASK, seed=SEED, n_streams=n_streams, batch_size=batch,
                      shuffle_buffer=0, max_txt_len=60, img_dim=16)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_data")
    first = epoch_shard_order(3, SEED, TASK)[0]
    return out, write_bad_dataset(out, corrupt_first=first)


def test_every_reason_is_planted():
    assert "corrupt_tar" in SKIP_REASONS
    from data.shards import decode_region_sample
    tok = load_tokenizer(VOCAB)
    for reason in SKIP_REASONS:
        if reason != "corrupt_tar":
            raw = {k: (v if isinstance(v, bytes) else __import__("json").dumps(v).encode())
                   for k, v in bad_sample(reason, "k").items() if k != "__key__"}
            assert decode_region_sample(raw, tok, 60, 16)[1] == reason


def test_truncated_shard_raises_after_complete_samples(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, good_samples(6))
    assert truncate_mid_member(path, 2 * 4 + 1) == 4  # samples 0-3; 4 lost with its npz
    with pytest.raises(tarfile.TarError):
        list(iter_shard(path))


def test_reader_skips_rest_of_corrupt_shard_and_counts_it_once(tmp_path, caplog):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, good_samples(6))
    readable = truncate_mid_member(a, 2 * 4 + 1)
    write_shard(b, good_samples(10, split="val"))
    tok = load_tokenizer(VOCAB)
    reader = StreamReader(spec_for([a, b], batch=2), tok, 0)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        it = reader.batches()
        keys = []
        while True:
            epoch, index, samples = next(it)
            if epoch > 0:
                break
            keys += [s.key for s in samples]
    assert len(keys) == readable + 10 and len(set(keys)) == len(keys)
    assert reader.take_counts()[0] == {"corrupt_tar": 1}  # nothing taken yet: the whole read
    assert sum(str(a) in r.getMessage() for r in caplog.records) == 1


def test_batches_carry_count_deltas_and_loader_sums_them(bad_data):
    out, expected = bad_data
    tok = load_tokenizer(VOCAB)
    spec = spec_for(read_manifest(out / "train").shards)
    collate = functools.partial(collate_mlm, tok=tok)
    # Raw batches: deltas per batch, summing to the planted counts over one epoch.
    ds = TaskBatches(spec, tok, collate, [0])
    per_batch_seen, skipped = [], Counter()
    for batch in ds:
        if batch["epoch"] > 0:
            break
        per_batch_seen.append(batch["data_seen"])
        skipped.update(batch["data_skipped"])
        assert batch["data_seen"] == 8
        assert len(batch["keys"]) == 8 - sum(batch["data_skipped"].values()) + batch["data_skipped"].get("corrupt_tar", 0)
    assert sum(per_batch_seen) == expected["seen"] and dict(skipped) == expected["skipped"]
    # Through the loader: popped from the batch, accumulated; positions unchanged in format.
    loader = ResumableTaskLoader(TaskBatches(spec, tok, collate, [0]), 0)
    for _ in range(expected["seen"] // 8):
        batch = loader.next()
        assert "data_skipped" not in batch and "data_seen" not in batch
    assert loader.skip_counts == expected["skipped"] and loader.seen == expected["seen"]
    assert loader.state_dict() == {"0": [0, expected["seen"] // 8]}


def test_resumed_stream_does_not_recount_skipped_batches(bad_data):
    out, expected = bad_data
    tok = load_tokenizer(VOCAB)
    spec = spec_for(read_manifest(out / "train").shards)
    collate = functools.partial(collate_mlm, tok=tok)
    first = ResumableTaskLoader(TaskBatches(spec, tok, collate, [0]), 0)
    for _ in range(3):
        first.next()
    second = ResumableTaskLoader(TaskBatches(spec, tok, collate, [0], {0: (0, 3)}), 0)
    for _ in range(3):
        second.next()
    total = Counter(first.skip_counts) + Counter(second.skip_counts)
    assert dict(total) == expected["skipped"] and first.seen + second.seen == expected["seen"]


def test_counts_come_back_from_workers(bad_data):
    out, expected = bad_data
    tok = load_tokenizer(VOCAB)
    spec = spec_for(read_manifest(out / "train").shards, batch=4, n_streams=2)
    loader = ResumableTaskLoader(TaskBatches(spec, tok, functools.partial(collate_mlm, tok=tok), [0, 1]), 2)
    assert loader.num_workers == 2
    while True:
        b = loader.next()
        if b["epoch"] > 0:
            break
    # Every bad sample is read by exactly one of the two streams (3 shards over 2 streams);
    # only the streams' last partial batches may go unread.
    assert set(loader.skip_counts) <= set(SKIP_REASONS)
    assert loader.skip_counts.get("corrupt_tar", 0) <= 1 and loader.seen > expected["seen"] - 8
    assert sum(loader.skip_counts.values()) >= 10
