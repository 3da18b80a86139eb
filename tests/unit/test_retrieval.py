"""Retrieval evaluation: ITC picks k candidates per query, ITM re-ranks them, R@K counts the
true match in the top K. Checked against a brute-force ranking computed here, through a fake
engine whose features and match scores are fixed tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.pixels import MEAN, STD, PixelConfig
from trainer.models.albef import Albef
from trainer.retrieval import RetrievalSet, retrieval_metrics, retrieval_scores

N_IMAGES, CAPTIONS_PER_IMAGE, DIM = 12, 2, 8


class TableEngine:
    """An engine whose image i / text t embed as rows of fixed tables and whose ITM score of
    (t, i) is SCORE[t, i]; image i is a grey picture of level 10 * i, text t has id t at column 1."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n_texts = N_IMAGES * CAPTIONS_PER_IMAGE
        self.image_feat = torch.nn.functional.normalize(torch.randn(N_IMAGES, DIM, generator=g), dim=1)
        self.text_feat = torch.nn.functional.normalize(torch.randn(n_texts, DIM, generator=g), dim=1)
        self.score = torch.randn(n_texts, N_IMAGES, generator=g)
        self.modes = []

    def eval(self):
        self.modes.append("eval")

    def train(self):
        self.modes.append("train")

    def __call__(self, batch: dict, fn):
        """`engine(batch, fn)` as the real engine: fn is `Albef.embed` or `Albef.itm_score`."""
        if fn is Albef.embed and "pixels" in batch:
            level = (batch["pixels"][:, 0, 0, 0] * STD[0] + MEAN[0]) * 255.0
            i = torch.round(level / 10.0).long()
            return {"image_feat": self.image_feat[i], "image_tokens": i.float()[:, None, None]}
        if fn is Albef.embed:
            t = batch["input_ids"][:, 1]
            return {"text_feat": self.text_feat[t], "text_states": t.float()[:, None, None]}
        assert fn is Albef.itm_score, fn
        t, i = batch["text_states"][:, 0, 0].long(), batch["image_tokens"][:, 0, 0].long()
        return self.score[t, i]


def retrieval_set() -> RetrievalSet:
    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)) for i in range(N_IMAGES)]
    n_texts = N_IMAGES * CAPTIONS_PER_IMAGE
    ids = torch.zeros(n_texts, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(n_texts)
    return RetrievalSet(images, ids, torch.ones_like(ids), torch.arange(n_texts) // CAPTIONS_PER_IMAGE)


def brute_force_ranks(sims, score, truth, k):
    ranks = []
    for q in range(sims.shape[0]):
        candidates = sorted(range(sims.shape[1]), key=lambda c: -sims[q, c])[:k]
        order = sorted(candidates, key=lambda c: -score[q, c])
        hits = [r for r, c in enumerate(order) if truth[q, c]]
        ranks.append(hits[0] if hits else sims.shape[1] - 1)  # outside the top k: last
    return np.array(ranks)


@pytest.mark.parametrize("k, batch_size", [(4, 5), (12, 64), (30, 7)])
def test_recalls_match_a_brute_force_ranking(k, batch_size):
    engine, data = TableEngine(), retrieval_set()
    got = retrieval_metrics(engine, data, PixelConfig(image_size=8), k=k, batch_size=batch_size,
                            device=torch.device("cpu"))
    sims = (engine.text_feat @ engine.image_feat.t()).numpy()
    truth = (data.text_image[:, None] == torch.arange(N_IMAGES)[None, :]).numpy()
    t2i = brute_force_ranks(sims, engine.score.numpy(), truth, min(k, N_IMAGES))
    i2t = brute_force_ranks(sims.T, engine.score.numpy().T, truth.T, min(k, len(truth)))
    for at in (1, 5, 10):
        assert got[f"t2i_r{at}"] == pytest.approx(100.0 * (t2i < at).mean())
        assert got[f"i2t_r{at}"] == pytest.approx(100.0 * (i2t < at).mean())
    assert got["t2i_r1_chance"] == pytest.approx(100.0 / N_IMAGES)
    assert got["r_mean"] == pytest.approx(np.mean([got[f"{d}_r{at}"] for d in ("t2i", "i2t") for at in (1, 5, 10)]))
    assert engine.modes == ["eval", "train"]


@pytest.mark.parametrize("k", [4, 12])
def test_score_matrices_hold_the_itm_scores_of_each_querys_top_k_and_minus_100_elsewhere(k):
    """ALBEF's score matrices, built here from the tables: per text, its k most similar images hold
    SCORE[t, i]; per image, its k most similar texts hold SCORE[t, i]; every other entry is -100."""
    engine, data = TableEngine(), retrieval_set()
    got = retrieval_scores(engine, data, PixelConfig(image_size=8), k=k, batch_size=5, device=torch.device("cpu"))
    sims, score = (engine.text_feat @ engine.image_feat.t()).numpy(), engine.score.numpy()
    want_t2i = np.full(score.shape, -100.0, dtype=np.float32)
    for t in range(score.shape[0]):
        top = np.argsort(-sims[t])[:min(k, N_IMAGES)]
        want_t2i[t, top] = score[t, top]
    want_i2t = np.full(score.T.shape, -100.0, dtype=np.float32)
    for i in range(N_IMAGES):
        top = np.argsort(-sims[:, i])[:k]
        want_i2t[i, top] = score[top, i]
    np.testing.assert_array_equal(got.t2i.numpy(), want_t2i)
    np.testing.assert_array_equal(got.i2t.numpy(), want_i2t)
    assert got.metrics == retrieval_metrics(TableEngine(), data, PixelConfig(image_size=8), k=k, batch_size=5,
                                            device=torch.device("cpu"))


def test_a_match_outside_the_candidates_does_not_count_for_a_larger_k():
    """k=1 and an ITC that puts every caption on the wrong picture: nothing is found, so R@5
    and R@10 are 0 (not 100, as if the missed match sat just below the one candidate)."""
    engine, data = TableEngine(), retrieval_set()
    engine.text_feat = engine.image_feat[(data.text_image + 1) % N_IMAGES]
    got = retrieval_metrics(engine, data, PixelConfig(image_size=8), k=1, batch_size=8, device=torch.device("cpu"))
    assert got["t2i_r1"] == got["t2i_r5"] == got["t2i_r10"] == 0.0


def test_a_perfect_model_scores_100():
    engine, data = TableEngine(), retrieval_set()
    engine.text_feat = engine.image_feat[data.text_image]  # each caption sits on its picture
    engine.score = (data.text_image[:, None] == torch.arange(N_IMAGES)[None, :]).float()
    got = retrieval_metrics(engine, data, PixelConfig(image_size=8), k=3, batch_size=8, device=torch.device("cpu"))
    assert got["t2i_r1"] == got["i2t_r1"] == 100.0


def test_chance_levels_of_both_directions():
    from trainer.retrieval import chance_levels

    # 4 images with 3, 1, 0 and 4 captions: an image's random top-1 text is one of its own
    # with probability captions / 8; averaged over the 4 images that is 1 / 4 as well.
    got = chance_levels(torch.tensor([0, 0, 0, 1, 3, 3, 3, 3]), 4)
    assert got["t2i_r1_chance"] == pytest.approx(25.0)
    assert got["i2t_r1_chance"] == pytest.approx(100.0 * (3 + 1 + 0 + 4) / 8 / 4)
