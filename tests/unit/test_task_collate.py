"""Downstream collates (data/tasks/collate.py): the batch contract of docs/downstream.md, "Batches"."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.tasks.collate import (_truncate, collate_nlvr2, collate_re, collate_retrieval_pairs,
                                collate_retrieval_train, collate_ve, collate_vcr, collate_vqa)
from data.tasks.features import Regions
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH

DIM = 4
COMMON = {"input_ids", "position_ids", "txt_lens", "img_feat", "img_pos_feat", "num_bbs", "attn_masks",
          "gather_index", "ids", "task", "n_items"}
IMAGE_CODE = {}
"""image_id -> the constant that fills its features' column 0 (identifies a row's image)."""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_VOCAB_PATH)


def _ids(tok, text: str) -> list[int]:
    """Hand tokenization: every word of the demo vocabulary is one word piece."""
    return [tok.token_to_id(w) for w in text.split()]


def _regions(image_id: str, n: int) -> Regions:
    code = IMAGE_CODE.setdefault(image_id, float(len(IMAGE_CODE) + 1))
    feat = np.zeros((n, DIM), np.float32)
    feat[:, 0] = code
    feat[:, 1] = np.arange(n)  # region index
    pos = np.random.default_rng(n).random((n, 7)).astype(np.float32)
    return Regions(image_id, feat, pos)


def _row_images(batch) -> list[float]:
    """The image code of each row (column 0 of its first region)."""
    return batch["img_feat"][:, 0, 0].tolist()


def _row_words(batch) -> list[list[int]]:
    return [row[1 : int(n) - 1] for row, n in zip(batch["input_ids"].tolist(), batch["txt_lens"])]


def _check_layout(batch, tok) -> None:
    """Common keys: padding, `[CLS] ... [SEP]`, and row i's regions gathered right after its text."""
    ids, lens, nbbs = batch["input_ids"], batch["txt_lens"], batch["num_bbs"]
    lt, ni = ids.shape[1], batch["img_feat"].shape[1]
    assert batch["position_ids"].tolist() == [list(range(lt))]
    assert int(lens.max()) == lt and int(nbbs.max()) == ni
    assert batch["attn_masks"].shape == batch["gather_index"].shape == (len(ids), int((lens + nbbs).max()))
    for i, (tl, nbb) in enumerate(zip(lens.tolist(), nbbs.tolist())):
        assert ids[i, 0] == tok.cls_id and ids[i, tl - 1] == tok.sep_id and (ids[i, tl:] == 0).all()
        assert batch["attn_masks"][i].tolist() == [1] * (tl + nbb) + [0] * (batch["attn_masks"].shape[1] - tl - nbb)
        gather = batch["gather_index"][i].tolist()
        assert gather[:tl] == list(range(tl))
        assert gather[tl : tl + nbb] == list(range(lt, lt + nbb))  # row i's regions right after its text
        assert (batch["img_feat"][i, nbb:] == 0).all() and (batch["img_pos_feat"][i, nbb:] == 0).all()
        assert batch["img_feat"][i, :nbb, 1].tolist() == list(range(nbb)) or batch["task"] == "nlvr2"
    for key in ("input_ids", "txt_lens", "num_bbs", "attn_masks", "gather_index", "position_ids"):
        assert batch[key].dtype == torch.long, key
    assert batch["img_feat"].dtype == batch["img_pos_feat"].dtype == torch.float32
    assert batch["img_feat"].shape[2] == DIM and batch["img_pos_feat"].shape[2] == 7


# ------------------------------------------------------------------ VQA, VE

VQA = [
    ({"id": "q0", "image_id": "v0", "text": "is cube red", "labels": [2, 0], "scores": [1.0, 0.3]},
     [_regions("v0", 3)]),
    ({"id": "q1", "image_id": "v1", "text": "blue", "labels": [], "scores": []}, [_regions("v1", 5)]),
    ({"id": "q2", "image_id": "v0", "text": "ball left of cone", "labels": [4], "scores": [0.6]}, [_regions("v0", 3)]),
]


def test_vqa_batch(tok):
    batch = collate_vqa(VQA, np.random.default_rng(0), tok=tok, max_txt_len=60, num_answers=5)
    assert set(batch) == COMMON | {"targets"}
    _check_layout(batch, tok)
    assert _row_words(batch) == [_ids(tok, "is cube red"), _ids(tok, "blue"), _ids(tok, "ball left of cone")]
    assert batch["txt_lens"].tolist() == [5, 3, 6] and batch["num_bbs"].tolist() == [3, 5, 3]
    assert batch["input_ids"].shape == (3, 6) and batch["img_feat"].shape == (3, 5, DIM)
    assert batch["gather_index"][0].tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 8]  # L = 9; pads point anywhere
    assert batch["ids"] == ["q0", "q1", "q2"] and batch["task"] == "vqa" and batch["n_items"] == 3
    assert batch["targets"].dtype == torch.float32
    np.testing.assert_allclose(batch["targets"].numpy(), [[0.3, 0, 1.0, 0, 0], [0] * 5, [0, 0, 0, 0, 0.6]], rtol=1e-6)


def test_vqa_truncates_text_and_handles_test_split(tok):
    test = [({k: v for k, v in ex.items() if k not in ("labels", "scores")}, r) for ex, r in VQA]
    batch = collate_vqa(test, np.random.default_rng(0), tok=tok, max_txt_len=2, num_answers=5)
    assert "targets" not in batch and set(batch) == COMMON
    assert _row_words(batch) == [_ids(tok, "is cube"), _ids(tok, "blue"), _ids(tok, "ball left")]
    mixed = collate_vqa([test[0], VQA[2]], np.random.default_rng(0), tok=tok, max_txt_len=60, num_answers=5)
    np.testing.assert_allclose(mixed["targets"].numpy(), [[0] * 5, [0, 0, 0, 0, 0.6]], rtol=1e-6)  # no labels: 0 row


def test_vqa_user_errors(tok):
    with pytest.raises(ValueError, match="manifest"):
        collate_vqa(VQA, np.random.default_rng(0), tok=tok, max_txt_len=60, num_answers=3)
    with pytest.raises(ValueError, match="empty batch"):
        collate_vqa([], np.random.default_rng(0), tok=tok, max_txt_len=60, num_answers=5)
    with pytest.raises(ValueError, match="max_txt_len"):
        collate_vqa(VQA, np.random.default_rng(0), tok=tok, max_txt_len=0, num_answers=5)
    odd = (dict(VQA[0][0], image_id="odd"), [Regions("odd", np.zeros((2, DIM + 1), np.float32),
                                                      np.zeros((2, 7), np.float32))])
    with pytest.raises(ValueError, match="img_dim"):
        collate_vqa([VQA[0], odd], np.random.default_rng(0), tok=tok, max_txt_len=60, num_answers=5)


def test_ve_one_hot_targets(tok):
    samples = [({"id": f"h{i}", "image_id": "e0", "text": "red cube", "label": label}, [_regions("e0", 2)])
               for i, label in enumerate([0, 2, 1])]
    batch = collate_ve(samples, np.random.default_rng(0), tok=tok, max_txt_len=60)
    assert set(batch) == COMMON | {"targets"} and batch["task"] == "ve" and batch["n_items"] == 3
    _check_layout(batch, tok)
    assert batch["targets"].dtype == torch.float32
    assert batch["targets"].tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    test = [({k: v for k, v in ex.items() if k != "label"}, r) for ex, r in samples]
    assert "targets" not in collate_ve(test, np.random.default_rng(0), tok=tok, max_txt_len=60)
    with pytest.raises(ValueError, match="all labelled"):
        collate_ve([samples[0], test[1]], np.random.default_rng(0), tok=tok, max_txt_len=60)


# ------------------------------------------------------------------ retrieval

CAPTIONS = [("c0", "r0", "red cube"), ("c1", "r0", "cube left of ball"), ("c2", "r1", "blue ball"),
            ("c3", "r2", "green cone"), ("c4", "r3", "white ring")]
RET = [({"id": cid, "image_id": img, "text": text}, [_regions(img, 2 + k % 3)])
       for k, (cid, img, text) in enumerate(CAPTIONS)]


def test_retrieval_train_groups(tok):
    k = 2
    batch = collate_retrieval_train(RET, np.random.default_rng(3), tok=tok, max_txt_len=60, negative_size=k)
    g = 1 + 2 * k
    assert set(batch) == COMMON | {"sample_size"}
    assert batch["sample_size"] == g and batch["n_items"] == len(RET) * (g - 1)
    assert batch["ids"] == [c for c, _, _ in CAPTIONS] and batch["task"] == "retrieval"
    assert len(batch["input_ids"]) == len(RET) * g
    _check_layout(batch, tok)
    words, images = _row_words(batch), _row_images(batch)
    text_image = {tuple(_ids(tok, text)): IMAGE_CODE[img] for _, img, text in CAPTIONS}
    for i, (ex, _) in enumerate(RET):
        own_words, own_image = _ids(tok, ex["text"]), IMAGE_CODE[ex["image_id"]]
        rows = range(i * g, (i + 1) * g)
        gw, gi = [words[r] for r in rows], [images[r] for r in rows]
        assert gw[0] == own_words and gi[0] == own_image  # the positive first
        assert gw[1 : 1 + k] == [own_words] * k  # (t, I-neg): own caption, other images
        assert own_image not in gi[1 : 1 + k] and len(set(gi[1 : 1 + k])) == k  # distinct other images
        assert gi[1 + k :] == [own_image] * k  # (t-neg, I): own image, captions of other images
        assert all(text_image[tuple(w)] != own_image for w in gw[1 + k :])
    again = collate_retrieval_train(RET, np.random.default_rng(3), tok=tok, max_txt_len=60, negative_size=k)
    assert all(torch.equal(batch[key], again[key]) for key in ("input_ids", "img_feat", "gather_index"))


def test_retrieval_train_negatives_never_share_the_image(tok):
    for seed in range(30):
        batch = collate_retrieval_train(RET, np.random.default_rng(seed), tok=tok, max_txt_len=60, negative_size=3)
        images = np.array(_row_images(batch)).reshape(len(RET), 7)
        assert (images[:, 1:4] != images[:, :1]).all() and (images[:, 4:] == images[:, :1]).all()


def test_retrieval_train_too_few_images(tok):
    # caption c0 sees 3 other images (r1, r2, r3): K = 4 cannot be met
    with pytest.raises(ValueError, match="micro_batch_size above finetune.negative_size"):
        collate_retrieval_train(RET, np.random.default_rng(0), tok=tok, max_txt_len=60, negative_size=4)
    with pytest.raises(ValueError, match="negative_size"):
        collate_retrieval_train(RET, np.random.default_rng(0), tok=tok, max_txt_len=60, negative_size=0)


def test_retrieval_pairs(tok):
    pairs = [(RET[0][0], RET[3][1][0]), (RET[2][0], RET[2][1][0]), (RET[4][0], RET[0][1][0])]
    batch = collate_retrieval_pairs(pairs, tok=tok, max_txt_len=60)
    assert set(batch) == COMMON | {"pairs"}
    _check_layout(batch, tok)
    assert batch["pairs"] == [("c0", "r2"), ("c2", "r1"), ("c4", "r0")]
    assert batch["ids"] == ["c0", "c2", "c4"] and batch["n_items"] == 3
    assert _row_images(batch) == [IMAGE_CODE[i] for i in ("r2", "r1", "r0")]
    assert _row_words(batch) == [_ids(tok, t) for t in ("red cube", "blue ball", "white ring")]


# ------------------------------------------------------------------ NLVR2

NLVR2 = [
    ({"id": "dev-1-0-0", "image_ids": ["n0", "n1"], "text": "there is a red cube", "label": 1},
     [_regions("n0", 2), _regions("n1", 3)]),
    ({"id": "dev-2-0-0", "image_ids": ["n2", "n3"], "text": "blue", "label": 0},
     [_regions("n2", 4), _regions("n3", 1)]),
]


@pytest.mark.parametrize("variant", ["paired", "paired-attn"])
def test_nlvr2_paired_interleaves(tok, variant):
    batch = collate_nlvr2(NLVR2, np.random.default_rng(0), tok=tok, max_txt_len=60, variant=variant)
    assert set(batch) == COMMON | {"targets", "img_type_ids"}
    _check_layout(batch, tok)
    assert _row_images(batch) == [IMAGE_CODE[i] for i in ("n0", "n1", "n2", "n3")]  # ex0-L, ex0-R, ex1-L, ex1-R
    words = _row_words(batch)
    assert words[0] == words[1] == _ids(tok, "there is a red cube") and words[2] == words[3] == _ids(tok, "blue")
    assert batch["num_bbs"].tolist() == [2, 3, 4, 1]
    assert batch["img_type_ids"].tolist() == [[1, 1, 0, 0], [2, 2, 2, 0], [1, 1, 1, 1], [2, 0, 0, 0]]
    assert batch["targets"].tolist() == [1, 0] and batch["targets"].dtype == torch.long
    assert batch["ids"] == ["dev-1-0-0", "dev-2-0-0"] and batch["n_items"] == 2 and batch["task"] == "nlvr2"


def test_nlvr2_triplet_layout(tok):
    batch = collate_nlvr2(NLVR2, np.random.default_rng(0), tok=tok, max_txt_len=60, variant="triplet")
    assert set(batch) == COMMON | {"targets", "img_type_ids"}
    _check_layout(batch, tok)
    assert batch["num_bbs"].tolist() == [5, 5] and batch["img_feat"].shape == (2, 5, DIM)
    codes = batch["img_feat"][:, :, 0].tolist()
    assert codes == [[IMAGE_CODE["n0"]] * 2 + [IMAGE_CODE["n1"]] * 3, [IMAGE_CODE["n2"]] * 4 + [IMAGE_CODE["n3"]]]
    assert batch["img_feat"][0, :, 1].tolist() == [0, 1, 0, 1, 2]  # left regions, then right ones
    assert torch.equal(batch["img_pos_feat"][1, 4], torch.from_numpy(NLVR2[1][1][1].img_pos[0]))
    assert batch["img_type_ids"].tolist() == [[1, 1, 2, 2, 2], [1, 1, 1, 1, 2]]
    assert batch["targets"].tolist() == [1, 0] and batch["n_items"] == 2


def test_nlvr2_test_split_and_bad_variant(tok):
    test = [({k: v for k, v in ex.items() if k != "label"}, r) for ex, r in NLVR2]
    assert "targets" not in collate_nlvr2(test, np.random.default_rng(0), tok=tok, max_txt_len=60, variant="paired")
    with pytest.raises(ValueError, match="nlvr2_variant"):
        collate_nlvr2(NLVR2, np.random.default_rng(0), tok=tok, max_txt_len=60, variant="pair")


# ------------------------------------------------------------------ referring expressions

RE = [({"id": "e0", "image_id": "g0", "text": "left cube", "target": 1, "box": [0, 0, 1, 1]}, [_regions("g0", 4)]),
      ({"id": "e1", "image_id": "g1", "text": "red ball", "target": 0, "box": [0, 0, 1, 1]}, [_regions("g1", 2)]),
      ({"id": "e2", "image_id": "g2", "text": "cone", "target": 4, "box": [0, 0, 1, 1]}, [_regions("g2", 5)])]


def test_re_batch(tok):
    batch = collate_re(RE, np.random.default_rng(0), tok=tok, max_txt_len=60)
    assert set(batch) == COMMON | {"targets", "obj_masks", "re_rank_hard", "re_rank_random"}
    _check_layout(batch, tok)
    assert batch["targets"].tolist() == [1, 0, 4] and batch["targets"].dtype == torch.long
    assert batch["txt_lens"].tolist() == [4, 4, 3] and batch["num_bbs"].tolist() == [4, 2, 5]
    assert batch["obj_masks"].dtype == torch.bool
    assert batch["obj_masks"].tolist() == [[False] * 4 + [True], [False] * 2 + [True] * 3, [False] * 5]
    assert batch["re_rank_hard"].dtype == torch.bool and batch["re_rank_hard"].shape == (3,)
    assert batch["re_rank_random"].dtype == torch.long and batch["re_rank_random"].shape == (3,)
    assert batch["ids"] == ["e0", "e1", "e2"] and batch["n_items"] == 3 and batch["task"] == "re"


def test_re_rank_draws(tok):
    hard, seen = [], {i: set() for i in range(len(RE))}
    for seed in range(300):
        batch = collate_re(RE, np.random.default_rng(seed), tok=tok, max_txt_len=60)
        rand = batch["re_rank_random"].tolist()
        for i, (ex, (regions,)) in enumerate(RE):
            assert 0 <= rand[i] < regions.num_bb and rand[i] != ex["target"]
            seen[i].add(rand[i])
        hard += batch["re_rank_hard"].tolist()
    assert seen == {0: {0, 2, 3}, 1: {1}, 2: {0, 1, 2, 3}}  # every non-target, uniformly reachable
    assert 0.25 < np.mean(hard) < 0.35
    one = [({**RE[1][0], "image_id": "g3", "target": 0}, [_regions("g3", 1)])]
    assert collate_re(one, np.random.default_rng(0), tok=tok, max_txt_len=60)["re_rank_random"].tolist() == [0]  # no non-target


def test_re_target_outside_regions_is_an_invariant(tok):
    bad = [({**RE[1][0], "target": 2}, RE[1][1])]
    with pytest.raises(AssertionError):
        collate_re(bad, np.random.default_rng(0), tok=tok, max_txt_len=60)


# ------------------------------------------------------------------ VCR

VCR_EX = {"id": "vcr-0", "image_id": "w0", "question": "is cube red",
          "answers": ["red", "blue", "green ball", "left"], "rationales": ["left of cone", "ball", "to", "star"],
          "answer_label": 2, "rationale_label": 1}


def test_vcr_rows_and_type_ids(tok):
    samples = [({**VCR_EX, "mode": "qa"}, [_regions("w0", 2)]), ({**VCR_EX, "id": "vcr-1", "mode": "qar"},
                                                                  [_regions("w0", 2)])]
    batch = collate_vcr(samples, np.random.default_rng(0), tok=tok, max_txt_len=60)
    assert set(batch) == COMMON | {"targets", "txt_type_ids"}
    _check_layout(batch, tok)
    sep = tok.sep_id
    q = _ids(tok, "is cube red")
    words = _row_words(batch)
    assert words[:4] == [q + [sep] + _ids(tok, a) for a in VCR_EX["answers"]]  # question-major, Q->A
    assert words[4:] == [q + [sep] + _ids(tok, "green ball") + [sep] + _ids(tok, r) for r in VCR_EX["rationales"]]
    types = batch["txt_type_ids"].tolist()
    lt = batch["input_ids"].shape[1]
    # [CLS] is cube red [SEP] green ball [SEP]
    assert types[2] == [0, 0, 0, 0, 2, 2, 2, 2] + [0] * (lt - 8)
    # [CLS] is cube red [SEP] green ball [SEP] left of cone [SEP]
    assert types[4] == [0, 0, 0, 0, 2, 2, 2, 3, 3, 3, 3, 3]
    assert types[0] == [0, 0, 0, 0, 2, 2, 2] + [0] * (lt - 7)
    assert batch["txt_type_ids"].dtype == torch.long and batch["txt_type_ids"].shape == batch["input_ids"].shape
    assert batch["targets"].tolist() == [0, 0, 1, 0, 0, 1, 0, 0] and batch["targets"].dtype == torch.long
    assert batch["ids"] == ["vcr-0", "vcr-1"] and batch["n_items"] == 8 and batch["task"] == "vcr"


def test_vcr_truncation_and_test_split(tok):
    sample = ({**VCR_EX, "mode": "qar"}, [_regions("w0", 2)])
    batch = collate_vcr([sample], np.random.default_rng(0), tok=tok, max_txt_len=4)
    sep = tok.sep_id
    # 3 + 2 + 3 word pieces cut to 4: question to 1, answer to 1, then rationale to 2
    assert _row_words(batch)[0] == _ids(tok, "is") + [sep] + _ids(tok, "green") + [sep] + _ids(tok, "left of")
    assert batch["txt_type_ids"][0].tolist() == [0, 0, 2, 2, 3, 3, 3, 3]
    assert _truncate([[1, 2, 3], [4], [5, 6]], 2) == [[], [4], [5]]  # only when 3 non-empty sections cannot fit
    assert _truncate([[1, 2, 3], [4, 5]], 10) == [[1, 2, 3], [4, 5]]
    test = {k: v for k, v in VCR_EX.items() if k not in ("answer_label", "rationale_label")}
    assert "targets" not in collate_vcr([({**test, "mode": "qa"}, [_regions("w0", 2)])], np.random.default_rng(0),
                                        tok=tok, max_txt_len=60)
    with pytest.raises(ValueError, match="answer_label"):
        collate_vcr([({**test, "mode": "qar"}, [_regions("w0", 2)])], np.random.default_rng(0), tok=tok,
                    max_txt_len=60)
    with pytest.raises(ValueError, match="mode"):
        collate_vcr([(VCR_EX, [_regions("w0", 2)])], np.random.default_rng(0), tok=tok, max_txt_len=60)
