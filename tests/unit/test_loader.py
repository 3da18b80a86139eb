"""Readers: exactly-once epochs, equal batch counts, world-size invariance, exact resume, mixing."""
from collections import Counter

import pytest

from data.collate import collate_itm
from data.loader import StreamReader, merge_states, validation_batches
from data.shards import read_manifest
from data.sources import MixedSource, ShardSource, epoch_segments
from tests.loader_util import (UNEQUAL_SIZES, dataset_of, fingerprint, make_loader, spec_for, take,
                               tokenizer, write_sized_shards)
from trainer.task_mix import draw_task


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """7 shards of unequal size (5 .. 61 samples, 173 in all)."""
    return write_sized_shards(tmp_path_factory.mktemp("seven"), UNEQUAL_SIZES)


def one_epoch_per_rank(data, world, workers, **kw):
    """Every rank's batches of epoch 0 (`epochs=1`: the loaders end there)."""
    spec = spec_for(data, n_streams=world, parts=max(1, workers), epochs=1, **kw)
    return [list(make_loader(spec, [rank], workers=workers)) for rank in range(world)]


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 0), (1, 2)])
def test_epoch_sees_every_key_once_with_equal_batch_counts(seven, world, workers):
    per_rank = one_epoch_per_rank(seven, world, workers)
    keys = Counter(k for batches in per_rank for b in batches for k in b["keys"])
    total = read_manifest(seven).num_samples
    assert len(keys) == total and set(keys.values()) == {1}
    assert len({len(batches) for batches in per_rank}) == 1  # no rank waits on another at the end
    assert all(len(b["keys"]) <= 8 for batches in per_rank for b in batches)


def test_shard_order_is_shuffled_before_the_split(seven):
    ds = dataset_of(seven)
    firsts = {tuple(epoch_segments(ds, 3, 1, epoch, 0, 4)[0][:2]) for epoch in range(6)}
    assert len(firsts) > 1  # reader 0 does not always read the same shard
    for epoch in range(3):  # the readers' pieces tile the epoch exactly
        pieces = [p for r in range(4) for p in epoch_segments(ds, 3, 1, epoch, r, 4)]
        assert sum(b - a for _, a, b in pieces) == ds.num_samples


@pytest.mark.parametrize("task", ["mlm", "itm"])
def test_one_rank_two_accum_equals_two_ranks(demo_data, task):
    spec = spec_for(demo_data / "train", task=task, n_streams=2)
    one = make_loader(spec, [0, 1])
    r0, r1 = make_loader(spec, [0]), make_loader(spec, [1])
    for _ in range(12):
        assert fingerprint(one.next()) == fingerprint(r0.next())
        assert fingerprint(one.next()) == fingerprint(r1.next())


@pytest.mark.parametrize("mode", [{}, {"token_budget": 480}, {"resampled": True}, {"shuffle_buffer": 0}])
@pytest.mark.parametrize("k", [3, 7, 12])
def test_resume_after_k_batches_replays_exactly(seven, mode, k):
    spec = spec_for(seven, **mode)
    whole = take(make_loader(spec, [0]), 24)  # crosses epoch boundaries (173 samples, 8 a batch)
    first = make_loader(spec, [0])
    head = take(first, k)
    resumed = make_loader(spec, [0], state=first.state_dict())
    assert head + take(resumed, 24 - k) == whole


@pytest.mark.slow
def test_resume_across_two_ranks_and_two_workers(seven):
    spec = spec_for(seven, n_streams=2, parts=2)
    for k in (5, 11):  # batches per rank before the "kill": mid-shard for most readers
        whole, head, states = {}, {}, []
        for rank in range(2):
            whole[rank] = take(make_loader(spec, [rank], workers=2), 20)
            loader = make_loader(spec, [rank], workers=2)
            head[rank] = take(loader, k)
            states.append(loader.state_dict())
        merged = merge_states(states)  # what the checkpoint holds
        for rank in range(2):
            resumed = make_loader(spec, [rank], state=merged, workers=2)
            assert head[rank] + take(resumed, 20 - k) == whole[rank]


def test_resume_with_other_worker_count_is_an_actionable_error(seven):
    loader = make_loader(spec_for(seven), [0])
    take(loader, 2)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(spec_for(seven, parts=2), [0], state=loader.state_dict(), workers=2)


def test_position_reopens_the_shard_at_a_byte_offset(seven):
    reader = StreamReader(spec_for(seven, shuffle_buffer=0, batch_size=4), tokenizer(), 0)
    it = reader.batches()
    for _ in range(3):
        *_, position = next(it)
    assert position["source"]["offset"] > 0 and position["source"]["sample"] > 0


def test_mixing_three_datasets_1_2_1(tmp_path):
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}
    sizes = {"a": (30, 11), "b": (7, 20, 9), "c": (50,)}
    sets = {n: dataset_of(write_sized_shards(tmp_path / n, sizes[n], key_prefix=f"{n}-"), n, w)
            for n, w in weights.items()}
    sources = [ShardSource(ds, seed=1, name_id=i, reader=0, n_readers=1, resampled=False, cycle=True,
                           s3=None, stats={}, on_bad_shard=lambda *a: None) for i, ds in enumerate(sets.values())]
    mixed = MixedSource(sources, list(weights.values()), seed=1, name_id=9, reader=0)
    drawn = Counter(mixed.next()["__dataset__"] for _ in range(10_000))
    for name, w in weights.items():
        assert abs(drawn[name] / 10_000 - w / 4) < 0.03, drawn
    # Through a loader: batches carry each sample's dataset, and resume keeps the mix exact.
    spec = spec_for(datasets=tuple(sets.values()))
    loader = make_loader(spec, [0])
    batch = loader.next()
    assert set(batch["datasets"]) <= set(weights) and len(batch["datasets"]) == len(batch["keys"])
    whole = take(make_loader(spec, [0]), 10)
    first = make_loader(spec, [0])
    head = take(first, 4)
    assert head + take(make_loader(spec, [0], state=first.state_dict()), 6) == whole


def test_resampled_is_deterministic_and_differs_by_reader(seven):
    spec = spec_for(seven, resampled=True, n_streams=2)
    a, b = take(make_loader(spec, [0]), 6), take(make_loader(spec, [0]), 6)
    assert a == b and a != take(make_loader(spec, [1]), 6)
    assert a != take(make_loader(spec_for(seven, resampled=True, n_streams=2, seed=4), [0]), 6)


def test_token_budget_batches_fit_and_are_multiples_of_8(seven):
    budget = 400
    loader = make_loader(spec_for(seven, token_budget=budget, shuffle_buffer=64), [0])
    for _ in range(20):
        b = loader.next()
        n = len(b["keys"])
        rows = b["attn_masks"].shape[1]  # the longest text + regions row
        assert n % 8 == 0 and rows * n <= budget


def test_validation_split_is_exact_and_equal(demo_data):
    tok = tokenizer()
    shards = read_manifest(demo_data / "val").shards
    import functools
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


def test_more_readers_than_samples_is_an_actionable_error(seven):
    loader = make_loader(spec_for(seven, n_streams=200), [0])
    with pytest.raises(ValueError, match="fewer readers"):
        loader.next()


def test_mix_weights_are_checked():
    with pytest.raises(ValueError, match="weights"):
        MixedSource([object()], [0.0], seed=0, name_id=0, reader=0)


def test_old_position_format_is_refused(seven):
    with pytest.raises(ValueError, match="older vlpt"):
        make_loader(spec_for(seven), [0], state={"0": [0, 6]})


def test_pin_moves_cpu_tensors_and_keeps_other_values():
    import torch

    from data.loader import pin

    batch = {"ids": torch.arange(6).view(2, 3), "n_items": 2, "stream": "s"}
    out = pin(batch, torch.device("cpu"))
    assert torch.equal(out["ids"], batch["ids"]) and out["n_items"] == 2 and out["stream"] == "s"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_pin_takes_a_batch_that_is_already_on_the_gpu():
    """Retrieval re-scores (text states, image tokens) pairs that never left the GPU; pinning
    them raised "cannot pin 'CUDABFloat16Type'" in the first GPU run."""
    import torch

    from data.loader import pin

    cuda = torch.device("cuda")
    batch = {"text_states": torch.randn(2, 3, 4, device=cuda, dtype=torch.bfloat16),
             "attn_mask": torch.ones(2, 3, dtype=torch.long)}
    out = pin(batch, cuda)
    assert out["text_states"].device.type == "cuda" and out["attn_mask"].device.type == "cuda"
    assert torch.equal(out["text_states"], batch["text_states"])
