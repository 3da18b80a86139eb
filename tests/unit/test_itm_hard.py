"""Hard-negative ITM ("itm-hard"): candidate drawing in collate, hardest pick in the task function
(trainer/recipes/uniter_tasks.py)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from data.collate import collate_itm, collate_itm_hard
from data.config import DataConfig, UniterDataConfig
from data.shards import RegionSample
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining
from trainer.objectives.itm import WraConfig
from trainer.recipes.uniter_tasks import hardest_negatives, itm, itm_hard, task_functions

IMG_DIM = 16
WRA = WraConfig(iterations=10)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _sample(i: int, image_id: str, n_words: int, n_bb: int) -> RegionSample:
    """Features depend on image_id only: samples sharing an image share its regions."""
    img = np.random.default_rng(zlib.crc32(image_id.encode()))
    txt = np.random.default_rng(i)
    return RegionSample(
        key=f"s{i}", image_id=image_id,
        input_ids=txt.integers(5, 100, size=n_words).astype(np.int64),
        img_feat=img.standard_normal((n_bb, IMG_DIM)).astype(np.float32),
        img_pos=img.random((n_bb, 7)).astype(np.float32),
        soft_labels=np.full((n_bb, 9), 1 / 9, np.float32),
    )


def _samples(image_ids, n_bbs=None) -> list[RegionSample]:
    n_bbs = n_bbs or {img: 2 + k for k, img in enumerate(dict.fromkeys(image_ids))}
    return [_sample(i, img, 1 + (3 * i) % 5, n_bbs[img]) for i, img in enumerate(image_ids)]


MIXED = _samples(["a", "b", "b", "c", "d", "a"])  # 4 distinct images, two of them shown twice


def _row_pair(batch: dict, r: int, samples) -> tuple[int, str]:
    """(text sample, image_id) of packed row r, read back from its tensors."""
    tl, nbb = int(batch["txt_lens"][r]), int(batch["num_bbs"][r])
    ids = batch["input_ids"][r, 1 : tl - 1].numpy()
    texts = [i for i, s in enumerate(samples) if np.array_equal(s.input_ids, ids)]
    feats = batch["img_feat"][r, :nbb].numpy()
    images = {s.image_id for s in samples if s.img_feat.shape == feats.shape and np.array_equal(s.img_feat, feats)}
    assert len(texts) == 1 and len(images) == 1
    return texts[0], images.pop()


# ------------------------------------------------------------ collate

@pytest.mark.parametrize("candidates", [1, 2, 3, 7])
def test_candidates_are_distinct_other_images_of_the_text(tok, candidates):
    batch = collate_itm_hard(MIXED, np.random.default_rng(0), tok, candidates=candidates)
    b, k = len(MIXED), min(candidates, 3)  # 3 = distinct images other than the text's own
    cand = batch["hard_candidates"]
    assert cand.shape == (b, k) and cand.dtype == torch.long
    assert sorted(cand.flatten().tolist()) == list(range(b, b + b * k))  # each candidate row once
    for i, s in enumerate(MIXED):
        assert _row_pair(batch, i, MIXED) == (i, s.image_id)  # positives first, in order
        pairs = [_row_pair(batch, r, MIXED) for r in cand[i].tolist()]
        assert all(t == i for t, _ in pairs)
        images = [img for _, img in pairs]
        assert len(set(images)) == k and s.image_id not in images
    r = b + b * k
    assert batch["input_ids"].shape[0] == batch["img_feat"].shape[0] == batch["gather_index"].shape[0] == r
    assert batch["txt_lens"].shape == batch["num_bbs"].shape == batch["itm_targets"].shape == (r,)
    assert batch["itm_targets"].tolist() == [1] * b + [0] * (r - b)
    assert batch["hard_texts"].tolist() == list(range(b))
    assert batch["n_items"] == 2 * b
    assert batch["keys"] == [s.key for s in MIXED] and batch["task"] == "itm-hard"
    assert batch["position_ids"].shape == (1, batch["input_ids"].shape[1])


def test_layout_rows_pack_like_collate_itm(tok):
    """Each packed row equals the same pair collated on its own by collate_itm."""
    batch = collate_itm_hard(MIXED, np.random.default_rng(3), tok, candidates=2)
    for r in (0, 4, 7, batch["input_ids"].shape[0] - 1):
        t, img = _row_pair(batch, r, MIXED)
        j = next(j for j, s in enumerate(MIXED) if s.image_id == img)
        pair = RegionSample("p", img, MIXED[t].input_ids, MIXED[j].img_feat, MIXED[j].img_pos, MIXED[j].soft_labels)
        ref = collate_itm([pair], np.random.default_rng(0), tok, neg_prob=0.0)
        tl, nbb = int(ref["txt_lens"][0]), int(ref["num_bbs"][0])
        assert torch.equal(batch["input_ids"][r, :tl], ref["input_ids"][0])
        assert torch.equal(batch["img_pos_feat"][r, :nbb], ref["img_pos_feat"][0])
        lt = batch["input_ids"].shape[1]
        valid = batch["attn_masks"][r].bool()
        assert int(valid.sum()) == tl + nbb
        img_cols = batch["gather_index"][r, tl : tl + nbb]
        assert img_cols.tolist() == list(range(lt, lt + nbb))


@pytest.mark.parametrize("samples", [_samples(["x", "x", "x"]), _samples(["solo"])])
def test_no_other_image_means_no_negative(tok, samples):
    batch = collate_itm_hard(samples, np.random.default_rng(0), tok)
    b = len(samples)
    assert batch["hard_candidates"].shape == (b, 0) and batch["hard_texts"].numel() == 0
    assert batch["input_ids"].shape[0] == b and batch["itm_targets"].tolist() == [1] * b
    assert batch["n_items"] == b


def test_deterministic_given_rng(tok):
    def draw(seed):
        return collate_itm_hard(MIXED, np.random.default_rng(seed), tok, candidates=2)

    a, b = draw(5), draw(5)
    for key, v in a.items():
        assert torch.equal(v, b[key]) if isinstance(v, torch.Tensor) else v == b[key], key
    picks = {tuple(_row_pair(draw(s), r, MIXED)[1] for r in range(6, 18)) for s in range(6)}
    assert len(picks) > 1  # the seed matters


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_candidates_raise(tok, bad):
    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        collate_itm_hard(MIXED, np.random.default_rng(0), tok, candidates=bad)


def test_data_config_validates_candidates():
    assert DataConfig().uniter.itm_hard_candidates == UniterDataConfig().itm_hard_candidates == 7
    with pytest.raises(ValueError, match="itm_hard_candidates"):
        UniterDataConfig(itm_hard_candidates=0)


# ------------------------------------------------------------ task function, tiny real model

@pytest.fixture
def model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, img_dim=IMG_DIM, img_label_dim=9)
    torch.manual_seed(0)
    m = UniterForPretraining(cfg)
    with torch.no_grad():  # spread the ITM scores so argmax is far from float noise
        m.itm_output.weight.mul_(50)
    return m


def _record_encode(monkeypatch, model) -> list[dict]:
    calls, encode = [], model.encode

    def recording(batch, img_masks=None):
        out = encode(batch, img_masks)
        calls.append({"training": model.training, "grad": torch.is_grad_enabled(),
                      "requires_grad": out.requires_grad, "rows": batch["input_ids"].shape[0],
                      "img_feat": batch["img_feat"], "input_ids": batch["input_ids"]})
        return out

    monkeypatch.setattr(model, "encode", recording)
    return calls


def _pair(text: RegionSample, image: RegionSample) -> RegionSample:
    return RegionSample(text.key, text.image_id, text.input_ids, image.img_feat, image.img_pos, image.soft_labels)


def _expected(model, tok, samples, candidates_of):
    """Independent pick: score every (text, candidate image) pair in its own one-row batch."""
    model.eval()
    negatives = []
    with torch.no_grad():
        for i, cands in enumerate(candidates_of):
            scores = []
            for img in cands:
                one = collate_itm([_pair(samples[i], img)], np.random.default_rng(0), tok, neg_prob=0.0)
                logit = model.itm_logits(model.encode(one))[0]
                scores.append((logit[1] - logit[0]).item())
            negatives.append(_pair(samples[i], cands[int(np.argmax(scores))]))
    ref = collate_itm(list(samples) + negatives, np.random.default_rng(0), tok, neg_prob=0.0)
    ref["itm_targets"] = torch.tensor([1] * len(samples) + [0] * len(negatives))
    return ref, negatives


def _candidate_images(batch, samples):
    by_id = {s.image_id: s for s in reversed(samples)}  # first sample of each image_id
    return [[by_id[_row_pair(batch, r, samples)[1]] for r in row.tolist() if r >= 0]
            for row in batch["hard_candidates"]]


def test_task_trains_the_argmax_candidate(tok, model, monkeypatch):
    batch = collate_itm_hard(MIXED, np.random.default_rng(1), tok, candidates=3)
    ref, negatives = _expected(model, tok, MIXED, _candidate_images(batch, MIXED))
    want = itm(model, ref, WRA)
    calls = _record_encode(monkeypatch, model)
    got = itm_hard(model, batch, WRA)

    assert [c["rows"] for c in calls] == [len(MIXED) * 3, 2 * len(MIXED)]  # score all, train B + M
    trained = calls[1]
    b = len(MIXED)
    for i, neg in enumerate(negatives):  # the trained negative rows carry the picked images
        nbb = len(neg.img_feat)
        assert torch.equal(trained["img_feat"][b + i, :nbb], torch.from_numpy(neg.img_feat))
        assert torch.equal(trained["input_ids"][b + i], batch["input_ids"][i])
    assert got.losses.keys() == want.losses.keys() == {"loss"}
    assert torch.allclose(got.losses["loss"], want.losses["loss"], rtol=1e-5, atol=1e-6)
    assert set(got.stats) == set(want.stats) == {"loss", "acc", "ot_loss", "ot_pos", "ot_neg", "total"}
    for k in want.stats:
        assert torch.allclose(got.stats[k], want.stats[k], rtol=1e-5, atol=1e-6), k
    assert {k: v.item() for k, v in got.counts.items()} == {"ot_pos": b, "ot_neg": b}
    assert batch["n_items"] == 2 * b


def test_candidate_mask_is_respected(tok, model):
    """A -1 slot is never picked, even where its (clamped) row would score highest."""
    batch = collate_itm_hard(MIXED, np.random.default_rng(1), tok, candidates=3)
    free = hardest_negatives(model, batch)
    masked = dict(batch, hard_candidates=batch["hard_candidates"].clone())
    masked["hard_candidates"][:, 1:] = -1
    assert torch.equal(hardest_negatives(model, masked), masked["hard_candidates"][:, 0])
    masked["hard_candidates"][0, 0], masked["hard_candidates"][0, 2] = -1, batch["hard_candidates"][0, 2]
    assert hardest_negatives(model, masked)[0].item() == batch["hard_candidates"][0, 2].item()
    assert free.shape == (len(MIXED),)


def test_gradients_flow_and_scoring_builds_no_graph(tok, model, monkeypatch):
    model.train()
    batch = collate_itm_hard(MIXED, np.random.default_rng(2), tok, candidates=2)
    calls = _record_encode(monkeypatch, model)
    res = task_functions()["itm-hard"](model, batch)
    score, train = calls
    assert not score["grad"] and not score["requires_grad"] and not score["training"]  # eval, no graph
    assert train["grad"] and train["requires_grad"] and train["training"]
    assert model.training  # mode restored
    res.losses["loss"].backward()
    for p in (model.itm_output.weight, model.uniter.embeddings.word_embeddings.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(res.losses["loss"]) and res.losses["loss"].item() > 0


def test_no_candidates_trains_positives_only(tok, model, monkeypatch):
    samples = _samples(["x", "x", "x"])
    batch = collate_itm_hard(samples, np.random.default_rng(0), tok)
    calls = _record_encode(monkeypatch, model)
    via_forward = model(batch, task_functions()["itm-hard"])  # the default task functions include the task
    assert [c["rows"] for c in calls] == [3]  # no scoring pass
    monkeypatch.undo()
    want = itm(model.eval(), collate_itm(samples, np.random.default_rng(0), tok, neg_prob=0.0))
    got = itm_hard(model, batch)
    assert torch.allclose(got.losses["loss"], want.losses["loss"], rtol=1e-6)
    assert torch.isfinite(via_forward.losses["loss"]) and set(via_forward.losses) == {"loss"}
    assert got.counts["ot_neg"].item() == 0 and batch["n_items"] == 3
