"""Hard-negative retrieval (data/tasks/collate_hard.py, trainer/objectives/downstream.py): blocks of
candidates from the whole split, the hardest kept in eval mode, the hinge on the kept rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.tasks.collate_hard import CandidatePool, collate_retrieval_hard
from data.tasks.features import Regions
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from trainer.objectives.downstream import RANK_MARGIN, hardest_rows, retrieval_hard_train


class Store:
    """FeatureStore's `get` over made-up images; feature column 0 names the image, one image is bad."""

    def __init__(self, n: int, bad: str = "") -> None:
        self.regions = {f"img{i}": Regions(f"img{i}", np.full((2, 4), float(i), np.float32),
                                           np.zeros((2, 7), np.float32)) for i in range(n)}
        self.bad = bad

    def get(self, image_id: str):
        return (None, "bad_npz") if image_id == self.bad else (self.regions[image_id], None)


WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "cube", "ball", "cone", "ring")
"""Image i's captions say WORDS[i]: a row's caption names the image it describes."""


def _pool(n_images: int = 12, bad: str = "") -> CandidatePool:
    examples = [{"id": f"c{i}-{j}", "image_id": f"img{i}", "text": WORDS[i]} for i in range(n_images)
                for j in range(2)]
    return CandidatePool(examples, Store(n_images, bad))


def _batch(pool, queries=(0, 4), candidates=5, k=2, seed=0):
    samples = [(pool.examples[q], [pool.store.regions[pool.examples[q]["image_id"]]]) for q in queries]
    return collate_retrieval_hard(samples, np.random.default_rng(seed), tok=load_tokenizer(DEMO_VOCAB_PATH),
                                  max_txt_len=20, pool=pool, candidates=candidates, hard_size=k)


def test_blocks_hold_the_positive_then_other_images_then_other_captions():
    pool = _pool(bad="img5")
    batch = _batch(pool)
    group = batch["hard_group"]
    assert group == 6 and batch["hard_size"] == 2 and batch["n_items"] == 2 * 2 * 2
    image_of_row = batch["img_feat"][:, 0, 0].long().view(-1, group)  # [2Q, 1 + C]
    for q, own in enumerate((0, 2)):  # queries c0-0 (img0) and c2-0 (img2)
        text_side, image_side = image_of_row[2 * q], image_of_row[2 * q + 1]
        assert text_side[0] == own and image_side.tolist() == [own] * group  # the caption's own image
        negatives = text_side[1:].tolist()
        assert own not in negatives and 5 not in negatives and len(set(negatives)) == 5  # distinct, never bad
        tok = load_tokenizer(DEMO_VOCAB_PATH)
        words = [tok.decode([int(i)]) for i in batch["input_ids"][(2 * q + 1) * group:(2 * q + 2) * group, 1]]
        assert words[0] == WORDS[own] and WORDS[own] not in words[1:]  # own caption, then other images'
        text_words = {tok.decode([int(i)]) for i in batch["input_ids"][2 * q * group:(2 * q + 1) * group, 1]}
        assert text_words == {WORDS[own]}  # the text side repeats the query caption


def test_too_small_a_pool_is_one_line():
    with pytest.raises(ValueError, match="lower finetune.hard_candidates"):
        _batch(_pool(n_images=4), candidates=5)
    with pytest.raises(ValueError, match="between 1 and finetune.hard_candidates"):
        _batch(_pool(), candidates=5, k=6)


class ScoreModel(torch.nn.Module):
    """encode -> each row's score, carried in its input_ids (so row selection carries it too); records the
    train/eval mode each encode ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.modes = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, batch):
        self.modes.append(self.training)
        return batch["input_ids"][:, :1] * self.w  # [R, 1]

    def rank_scores(self, hidden):
        return hidden  # [R, 1]


def test_hardest_rows_keep_the_positive_and_the_top_k_in_eval_mode():
    scores = torch.tensor([0.0, 5.0, 1.0, 9.0, 3.0,   # block 0: positive, then 4 candidates
                           0.0, 2.0, 8.0, 7.0, 1.0])  # block 1
    batch = {"input_ids": scores[:, None], "hard_group": 5, "hard_size": 2}
    model = ScoreModel().train()
    rows = hardest_rows(model, batch)
    assert sorted(rows[:3].tolist()) == [0, 1, 3] and rows[0] == 0
    assert sorted(rows[3:].tolist()) == [5, 7, 8] and rows[3] == 5
    assert model.modes == [False] and model.training  # scored in eval mode, mode restored


def test_hard_loss_is_the_hinge_on_the_kept_rows():
    scores = torch.tensor([0.5, 5.0, 1.0, 9.0, 3.0, 0.2, 2.0, 8.0, 7.0, 1.0])
    batch = {"input_ids": scores[:, None], "hard_group": 5, "hard_size": 2}
    model = ScoreModel().train()
    result = retrieval_hard_train(model, batch)
    sig = torch.sigmoid(scores)
    expected = sum(torch.clamp(RANK_MARGIN + sig[j] - sig[p], min=0) for p, negs in ((0, (3, 1)), (5, (7, 8)))
                   for j in negs)
    assert torch.allclose(result.losses["loss"], expected)
    assert model.modes == [False, True]  # the scoring pass, then the pass with gradient
