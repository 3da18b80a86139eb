"""Packed UNITER rows (data/packing.py, data.uniter.pack_len): the layout, the config checks, the
block-diagonal encoder giving the unpacked losses and gradients, and `vlpt bench data --pack-len`."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from data.collate import collate_itm, collate_itm_hard, collate_mlm, collate_mrm
from data.config import UniterDataConfig
from data.packing import check_pack_len, pack_rows
from data.shards import Manifest, RegionSample
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from tests.engine_util import demo_region_samples, tiny_uniter
from trainer.models.bert import MASK_VALUE, block_diagonal_mask
from trainer.objectives.itm import WraConfig
from trainer.recipes.uniter_tasks import task_functions

DIM = 6
PACK_LEN = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _sample(i: int, n_words: int, n_bb: int) -> RegionSample:
    gen = np.random.default_rng(i)
    return RegionSample(key=f"s{i}", image_id=f"img{i}",
                        input_ids=gen.integers(10, 100, size=n_words).astype(np.int64),
                        img_feat=gen.standard_normal((n_bb, DIM)).astype(np.float32),
                        img_pos=gen.random((n_bb, 7)).astype(np.float32),
                        soft_labels=np.full((n_bb, 9), 1 / 9, np.float32))


def _ragged(n: int = 20, seed: int = 0) -> list[RegionSample]:
    gen = np.random.default_rng(seed)
    return [_sample(i, int(gen.integers(1, 20)), int(gen.integers(1, 12))) for i in range(n)]


# ------------------------------------------------------------------ the layout

def test_first_fit_decreasing_by_hand():
    # Longest first: 7 -> row 0, 6 -> row 1, 5 -> row 2, 3 -> row 2 (rows 0, 1 full), 2 -> row 1.
    assert pack_rows([5, 3, 7, 2, 6], 8) == [[2], [3, 4], [0, 1]]
    assert pack_rows([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]  # ties keep batch order


COLLATES = {"mlm": lambda s, tok, **kw: collate_mlm(s, np.random.default_rng(3), tok, **kw),
            "mrm": lambda s, tok, **kw: collate_mrm(s, np.random.default_rng(3), tok, **kw),
            "itm": lambda s, tok, **kw: collate_itm(s, np.random.default_rng(3), tok, **kw)}


@pytest.mark.parametrize("task", sorted(COLLATES))
@pytest.mark.parametrize("pack_len", [32, 64])
def test_every_position_once_in_order_and_segments_stay_in_one_row(tok, task, pack_len):
    samples = _ragged()
    plain = COLLATES[task](samples, tok)
    packed = COLLATES[task](samples, tok, pack_len=pack_len)
    lengths = (plain["txt_lens"] + plain["num_bbs"]).tolist()
    b, out_len = plain["attn_masks"].shape
    seg, pack_index, unpack = packed["segment_ids"], packed["pack_index"], packed["unpack_index"]
    assert seg.shape == pack_index.shape and seg.shape[1] == pack_len
    assert seg.shape[0] < b and seg.shape[0] >= -(-sum(lengths) // pack_len)
    for row_seg, row_index in zip(seg, pack_index):
        valid = row_seg >= 0
        n_valid = int(valid.sum())
        assert valid[:n_valid].all() and not valid[n_valid:].any()  # samples first, pads at the end
        ids = row_seg[:n_valid].tolist()
        runs = [i for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]
        assert len(runs) == len(set(runs))  # each sample one contiguous run
        for i in runs:  # ... holding its positions 0 .. n_i - 1 in order
            assert row_index[row_seg == i].tolist() == [i * out_len + j for j in range(lengths[i])]
    assert sorted(seg[seg >= 0].tolist()) == sorted(i for i, n in enumerate(lengths) for _ in range(n))
    flat_index, flat_seg = pack_index.reshape(-1), seg.reshape(-1)
    for i, n in enumerate(lengths):  # unpack_index inverts pack_index
        assert flat_index[unpack[i, :n]].tolist() == [i * out_len + j for j in range(n)]
        assert (flat_seg[unpack[i, :n]] == i).all()
    assert flat_seg[packed["cls_index"]].tolist() == list(range(b))
    assert flat_index[packed["cls_index"]].tolist() == [i * out_len for i in range(b)]  # position 0: [CLS]
    assert (packed["input_ids"][:, 0] == tok.cls_id).all()
    for key in ("mlm_index", "mrm_index"):
        if key in plain:  # the heads' flat positions point at the same sample positions
            assert torch.equal(flat_index[packed[key]], plain[key])
    for key, value in plain.items():  # the per-sample keys and targets are untouched
        if key not in ("mlm_index", "mrm_index"):
            assert torch.equal(value, packed[key]) if isinstance(value, torch.Tensor) else value == packed[key]


def test_packing_is_deterministic_and_off_adds_nothing(tok):
    samples = _ragged(seed=1)
    a, b = (collate_mrm(samples, np.random.default_rng(0), tok, pack_len=48) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in ("segment_ids", "pack_index", "unpack_index", "cls_index"))
    off = collate_mrm(samples, np.random.default_rng(0), tok, pack_len=0)
    assert not {"segment_ids", "pack_index", "unpack_index", "cls_index"} & off.keys()


def test_a_sample_longer_than_pack_len_names_the_key(tok):
    samples = [_sample(0, 3, 2), _sample(1, 20, 11)]  # 2 + 20 + 11 = 33 positions
    with pytest.raises(ValueError, match=re.escape("a sample of 33 positions")) as e:
        collate_mlm(samples, np.random.default_rng(0), tok, pack_len=32)
    assert "raise data.uniter.pack_len to at least 40" in str(e.value)


def test_block_diagonal_mask():
    seg = torch.tensor([[0, 0, 1, -1]])
    mask = block_diagonal_mask(seg, torch.float32)  # [1, 1, 4, 4]
    allowed = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0], (1 - allowed) * MASK_VALUE)


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("bad", [-8, 12, 1, True])
def test_pack_len_must_be_a_multiple_of_8(bad):
    with pytest.raises(ValueError, match=re.escape("data.uniter.pack_len must be 0 (no packing) or a positive "
                                                   f"multiple of 8, got {bad!r}; e.g. 128 or 256")):
        UniterDataConfig(pack_len=bad)
    assert UniterDataConfig(pack_len=128).pack_len == 128
    check_pack_len(0)


def test_pack_len_too_short_for_the_longest_caption_is_one_line():
    from trainer.config import load_config
    from trainer.config_files import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("configs/pretrain/demo.yaml", ["--data.uniter.pack_len=56"])  # max_txt_len 60
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert "data.uniter.pack_len=56 cannot hold the longest caption, data.max_txt_len=60" in message
    assert "e.g. 168" in message
    assert load_config("configs/pretrain/demo.yaml", ["--data.uniter.pack_len=64"]).data.uniter.pack_len == 64


def test_manifest_max_bb_is_checked_against_pack_len():
    from trainer.config import load_config
    from trainer.recipes.uniter import UniterRecipe

    cfg = load_config("configs/pretrain/demo.yaml", ["--data.uniter.pack_len=128", "--data.max_txt_len=30"])
    recipe = UniterRecipe(cfg)
    manifest = Manifest("/x", [], [], cfg.model.img_dim, cfg.model.img_label_dim, [], {"params": {"max_bb": 100}})
    with pytest.raises(ValueError, match=re.escape("data.uniter.pack_len=128 is shorter than the longest sample "
                                                   "data.train=/x can hold")) as e:
        recipe.check_manifest(manifest, "data.train=/x")
    assert "set it to at least 136" in str(e.value)
    recipe.check_manifest(Manifest("/x", [], [], cfg.model.img_dim, cfg.model.img_label_dim, [],
                                   {"params": {"max_bb": 96}}), "data.train=/x")  # 30 + 2 + 96 fits
    recipe.check_manifest(Manifest("/x", [], [], cfg.model.img_dim, cfg.model.img_label_dim, [], {}), "x")


def test_recipe_collate_packs_every_task_but_itm_hard(tok):
    from trainer.config import load_config
    from trainer.recipes.uniter import UniterRecipe

    samples = _ragged(8)
    rng = np.random.default_rng(0)
    on = UniterRecipe(load_config("configs/pretrain/demo.yaml", ["--data.uniter.pack_len=64"]))
    off = UniterRecipe(load_config("configs/pretrain/demo.yaml"))
    for task in ("mlm", "itm", "mrfr", "mrc", "mrc-kl"):
        assert on.collate(task, tok)(samples, rng)["segment_ids"].shape[1] == 64
        assert "segment_ids" not in off.collate(task, tok)(samples, rng)
    assert "segment_ids" not in on.collate("itm-hard", tok)(samples, rng)
    assert "segment_ids" not in collate_itm_hard(samples, rng, tok)


# ------------------------------------------------------------------ the model: same losses and gradients

@pytest.fixture(scope="module")
def region_samples(demo_data, tok):
    return demo_region_samples(demo_data, tok, 24)


def _collate(task: str, samples, tok, pack_len: int) -> dict:
    rng = np.random.default_rng(11)
    if task == "mlm":
        return collate_mlm(samples, rng, tok, pack_len=pack_len)
    if task == "itm":
        return collate_itm(samples, rng, tok, pack_len=pack_len)
    return collate_mrm(samples, rng, tok, task=task, pack_len=pack_len)


def _model(tok):
    """The tiny UNITER (dropout 0) with its weights shaken: at BERT's init std 0.02 attention is so flat
    that letting samples see each other moves the losses by only ~1e-6, below the tolerances; here by
    0.3 to 9 %."""
    model = tiny_uniter(tok).float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _loss_and_grads(model, batch: dict, fn) -> tuple[torch.Tensor, dict, dict]:
    model.zero_grad(set_to_none=True)
    result = model(batch, fn)
    result.losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result.losses["loss"].detach(), {k: v.detach() for k, v in result.stats.items()}, grads


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrc-kl", "itm"])
def test_packed_batch_gives_the_unpacked_losses_and_gradients(tok, region_samples, task):
    model = _model(tok).train()  # dropout 0: train mode is deterministic
    fn = task_functions(WraConfig())[task]  # ITM with WRA on (weight 0.1)
    plain = _collate(task, region_samples, tok, 0)
    packed = _collate(task, region_samples, tok, PACK_LEN)
    assert packed["segment_ids"].shape[0] < len(region_samples) / 2  # several samples a row
    assert packed["n_items"] == plain["n_items"]
    loss, stats, grads = _loss_and_grads(model, plain, fn)
    loss_p, stats_p, grads_p = _loss_and_grads(model, packed, fn)
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
    for key in stats:
        torch.testing.assert_close(stats_p[key], stats[key], rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_p.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        # Packed rows sum in another order than per-sample rows: fp32 leaves ~1e-6 of a tensor's
        # largest gradient on its elements that nearly cancel, hence atol relative to that scale.
        atol = 1e-5 * (1.0 + grad.abs().max().item())
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("task", ["mlm", "itm"])
def test_without_the_block_diagonal_mask_the_losses_differ(tok, region_samples, task, monkeypatch):
    """The control of the test above: packed rows where every sample sees the whole row."""
    import trainer.models.bert as bert

    model = _model(tok).train()
    fn = task_functions(WraConfig())[task]
    loss = _loss_and_grads(model, _collate(task, region_samples, tok, 0), fn)[0]
    monkeypatch.setattr(bert, "block_diagonal_mask",
                        lambda seg, dtype: (1.0 - (seg[:, None, None, :] >= 0).to(dtype)) * MASK_VALUE)
    leaky = _loss_and_grads(model, _collate(task, region_samples, tok, PACK_LEN), fn)[0]
    assert not torch.allclose(leaky, loss, rtol=1e-3, atol=0)


def test_packed_states_match_per_sample_states_and_pads_are_finite(tok, region_samples):
    from trainer.objectives.itm import unpack_rows

    model = _model(tok).eval()
    plain = _collate("itm", region_samples, tok, 0)
    packed = _collate("itm", region_samples, tok, PACK_LEN)
    with torch.no_grad():
        hidden = model.encode(plain)  # [B, L, H]
        rows = model.encode(packed)  # [R, Lp, H]
        assert rows.shape[:2] == packed["segment_ids"].shape and torch.isfinite(rows).all()
        valid = plain["attn_masks"].bool()  # [B, L]
        torch.testing.assert_close(unpack_rows(rows, packed["unpack_index"])[valid], hidden[valid],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.itm_logits(rows, packed["cls_index"]), model.itm_logits(hidden),
                                   rtol=1e-5, atol=1e-6)


def test_model_refuses_half_a_packed_layout(tok):
    model = tiny_uniter(tok)
    batch = collate_itm(_ragged(4), np.random.default_rng(0), tok, pack_len=64)
    batch["img_feat"] = torch.zeros(*batch["img_feat"].shape[:2], 16)  # the tiny model's img_dim
    with pytest.raises(ValueError, match="packed rows need both pack_index and segment_ids"):
        model.encode({k: v for k, v in batch.items() if k != "pack_index"})
    with pytest.raises(ValueError, match=re.escape("pack_index has shape")):
        model.encode({**batch, "pack_index": batch["pack_index"][:, :-8]})


# ------------------------------------------------------------------ vlpt bench data --pack-len

def test_bench_data_reports_padding_before_and_after_packing(demo_data, tmp_path, capsys):
    from vlpt.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data", str(demo_data / "train"), "--vocab", str(DEMO_VOCAB_PATH),
                 "--batch-size", "16", "--token-budget", "400", "--shuffle-buffer", "64", "--workers", "0",
                 "--max-samples", "64", "--pack-len", "64", "--out", str(out)]) == 0
    pad = json.loads(out.read_text())["padding"]
    assert pad["pack_len"] == 64 and 0 <= pad["packed"] < pad["fixed_size"] < 1
    assert 0 < pad["packed_mean_rows"] < pad["fixed_mean_batch"]
    printed = capsys.readouterr().out
    assert f"padding: fixed-size {pad['fixed_size']:.1%} -> packed (pack_len 64) {pad['packed']:.1%}" in printed


def test_bench_data_refuses_a_bad_pack_len(demo_data, capsys):
    from vlpt.cli import main

    assert main(["bench", "data", "--data", str(demo_data / "train"), "--pack-len", "100"]) == 2
    assert "--pack-len must be 0 (no packing) or a positive multiple of 8, got 100" in capsys.readouterr().err
