"""Bad input in the loader: corrupt shards end quietly and every skip is counted, per batch."""
import functools
import logging
import tarfile
from collections import Counter

import pytest

from data.collate import collate_mlm
from data.loader import StreamReader, TaskBatches, single_dataset
from data.shards import SKIP_REASONS, iter_shard, write_manifest, write_shard
from data.tokenizer import load_tokenizer
from tests.bad_input_data import (IMG_DIM, bad_sample, epoch_shard_order, good_samples, truncate_mid_member,
                                  write_bad_dataset)
from tests.loader_util import VOCAB, make_loader
from tests.loader_util import spec_for as loader_spec

SEED, TASK = 7, "mlm"


def spec_for(data, **kw):
    """One reader, no shuffling, 8-sample batches over a shard directory or a list of shards."""
    kw = {"task": TASK, "seed": SEED, "shuffle_buffer": 0, **kw}
    if isinstance(data, (list, tuple)):
        return loader_spec(datasets=single_dataset("train", data, [10] * len(data)), **kw)
    return loader_spec(data, **kw)


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
    write_manifest(tmp_path, [a, b], {"img_dim": IMG_DIM, "label_dim": 1601}, counts=[6, 10])
    reader = StreamReader(spec_for(tmp_path, batch_size=2, epochs=1), load_tokenizer(VOCAB), 0)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        keys = [s.key for _, _, samples, _ in reader.batches() for s in samples]
    assert len(keys) == readable + 10 and len(set(keys)) == len(keys)
    assert reader.take_counts()[0] == {"corrupt_tar": 1}  # nothing taken yet: the whole read
    assert sum(str(a) in r.getMessage() for r in caplog.records) == 1


def test_batches_carry_count_deltas_and_loader_sums_them(bad_data):
    out, expected = bad_data
    tok = load_tokenizer(VOCAB)
    spec = spec_for(out / "train", epochs=1)
    # Raw batches: deltas per batch, summing to the planted counts over one epoch.
    skipped, seen = Counter(), 0
    for batch in TaskBatches(spec, tok, functools.partial(collate_mlm, tok=tok), [0]):
        seen += batch["data_seen"]
        skipped.update(batch["data_skipped"])
        assert len(batch["keys"]) == batch["data_seen"] - sum(batch["data_skipped"].values()) + \
            batch["data_skipped"].get("corrupt_tar", 0)
    assert seen == expected["seen"] and dict(skipped) == expected["skipped"]
    # Through the loader: popped from the batch, accumulated.
    loader = make_loader(spec, [0])
    batches = list(loader)
    assert all("data_skipped" not in b and "data_seen" not in b for b in batches)
    assert loader.skip_counts == expected["skipped"] and loader.seen == expected["seen"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_resumed_reader_does_not_recount(bad_data, k):
    out, expected = bad_data
    spec = spec_for(out / "train", epochs=1)
    first = make_loader(spec, [0])
    for _ in range(k):
        first.next()
    second = make_loader(spec, [0], state=first.state_dict())
    list(second)
    total = Counter(first.skip_counts) + Counter(second.skip_counts)
    assert dict(total) == expected["skipped"] and first.seen + second.seen == expected["seen"]


def test_counts_come_back_from_workers(bad_data):
    out, expected = bad_data
    spec = spec_for(out / "train", batch_size=4, n_streams=2, parts=2, epochs=1)
    loaders = [make_loader(spec, [rank], workers=2) for rank in range(2)]
    for loader in loaders:
        list(loader)
    # Every sample is read by exactly one reader; the corrupt shard reported by the one holding the damage.
    assert sum((Counter(l.skip_counts) for l in loaders), Counter()) == Counter(expected["skipped"])
    assert sum(l.seen for l in loaders) == expected["seen"]
