"""Downstream metrics (trainer/downstream_metrics.py) on hand-computed cases, and the predictions
files (trainer/predictions.py) parsed back the way the official evaluators read them."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from trainer import predictions as P
from trainer.downstream_metrics import (accuracy, iou_xywh, nlvr2_metrics, nlvr2_sentence_key, re_accuracy,
                                        retrieval_recalls, vcr_metrics, vqa_score)

# ---------------------------------------------------------------------------- VQA / VE


def test_vqa_soft_score_by_hand():
    examples = [
        {"id": "0", "labels": [3, 7], "scores": [1.0, 0.3]},   # predicts 7 -> 0.3
        {"id": "1", "labels": [2], "scores": [0.6]},           # predicts 2 -> 0.6
        {"id": "2", "labels": [], "scores": []},               # no answer in the vocabulary -> 0
        {"id": "3", "labels": [1, 4], "scores": [0.9, 1.0]},   # predicts 0, not listed -> 0
    ]
    assert vqa_score(np.array([7, 2, 5, 0]), examples) == pytest.approx(0.9 / 4)


def test_vqa_rejects_wrong_length_and_test_split():
    with pytest.raises(ValueError, match="one per example"):
        vqa_score(np.array([1, 2]), [{"id": "0", "labels": [1], "scores": [1.0]}])
    with pytest.raises(ValueError, match="test split"):
        vqa_score(np.array([1]), [{"id": "0"}])
    with pytest.raises(ValueError, match="ints"):
        vqa_score(np.array([1.5]), [{"id": "0", "labels": [1], "scores": [1.0]}])


def test_ve_accuracy():
    assert accuracy(np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.array([], dtype=int), np.array([], dtype=int))


# ---------------------------------------------------------------------------- retrieval

# 3 captions x 3 images, caption i describes image i. Row rankings: c0's image at position 2,
# c1's at 0, c2's at 2. Column rankings: image 0 has c0 at 2, image 1 has c1 at 0, image 2 has c2 at 1.
S33 = np.array([[0.1, 0.5, 0.9],
                [0.2, 0.8, 0.3],
                [0.7, 0.6, 0.4]])
T33 = np.array([0, 1, 2])

# 4 captions x 2 images, two captions per image. Rows: c0 -> image 0 at 1, c1 at 0, c2 -> image 1 at 0,
# c3 at 1. Column 0 descending: c1, c3, c2, c0 -> image 0's best caption (c1) at 0. Column 1: c0, c2,
# c3, c1 -> image 1's best caption (c2) at 1.
S42 = np.array([[0.2, 0.9],
                [0.8, 0.1],
                [0.3, 0.7],
                [0.6, 0.4]])
T42 = np.array([0, 0, 1, 1])


def test_retrieval_3x3_by_hand():
    r = retrieval_recalls(S33, T33, ks=(1, 2, 3))
    assert r["img_r1"] == pytest.approx(1 / 3)
    assert r["img_r2"] == pytest.approx(1 / 3)
    assert r["img_r3"] == pytest.approx(1.0)
    assert r["txt_r1"] == pytest.approx(1 / 3)
    assert r["txt_r2"] == pytest.approx(2 / 3)
    assert r["txt_r3"] == pytest.approx(1.0)
    assert r["txt_r_mean"] == pytest.approx(2 / 3)
    assert r["img_r_mean"] == pytest.approx(5 / 9)
    assert r["r_mean"] == pytest.approx(11 / 18)


def test_retrieval_two_captions_per_image_by_hand():
    r = retrieval_recalls(S42, T42)
    assert set(r) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                      "txt_r_mean", "img_r_mean", "r_mean"}
    # Text side is per image (2 of them), the best of its two captions counts.
    assert (r["txt_r1"], r["txt_r5"], r["txt_r10"]) == (0.5, 1.0, 1.0)
    # Image side is per caption (4 of them).
    assert (r["img_r1"], r["img_r5"], r["img_r10"]) == (0.5, 1.0, 1.0)
    assert r["txt_r_mean"] == pytest.approx(5 / 6) and r["img_r_mean"] == pytest.approx(5 / 6)
    assert r["r_mean"] == pytest.approx(5 / 6)


def test_retrieval_compat_quirk_exceeds_one_on_a_tiny_set():
    true = retrieval_recalls(S33, T33)
    compat = retrieval_recalls(S33, T33, uniter_compat=True)
    # UNITER counts [position < K] + [caption row < K] per caption whose image it found in the top 10:
    # R@1 = (1 + 1) / 3, R@5 = R@10 = (3 + 3) / 3.
    assert true["img_r1"] == pytest.approx(1 / 3) and compat["img_r1"] == pytest.approx(2 / 3)
    assert compat["img_r5"] == pytest.approx(2.0) and compat["img_r10"] == pytest.approx(2.0)
    assert true["img_r5"] == 1.0
    # The text side has no such quirk.
    for k in ("txt_r1", "txt_r5", "txt_r10"):
        assert compat[k] == pytest.approx(true[k])


def test_retrieval_compat_ignores_hits_past_the_top_10():
    # 2 captions, 12 images: caption 0's image is 12th (position 11, not in the top 10), caption 1's is 4th.
    s = np.tile(np.arange(12, 0, -1, dtype=np.float64), (2, 1))   # column j scores 12 - j in both rows
    t = np.array([11, 3])
    true = retrieval_recalls(s, t)
    compat = retrieval_recalls(s, t, uniter_compat=True)
    assert (true["img_r1"], true["img_r5"], true["img_r10"]) == (0.0, 0.5, 0.5)
    # Caption 0 is never found, so its row index 0 adds nothing; caption 1 adds [3 < K] + [1 < K].
    assert (compat["img_r1"], compat["img_r5"], compat["img_r10"]) == (0.0, 1.0, 1.0)


def _uniter_reference(s: np.ndarray, t: np.ndarray) -> dict:
    """UNITER's retrieval evaluation written out with torch.topk (every image has a caption)."""
    torch = pytest.importorskip("torch")
    score = torch.from_numpy(s)
    n_txt, n_img = s.shape
    _, rank_txt = score.topk(10, dim=1)
    gt = torch.from_numpy(t).unsqueeze(1).expand_as(rank_txt)
    rank = (rank_txt == gt).nonzero()
    out = {f"img_r{k}": (rank < k).sum().item() / n_txt for k in (1, 5, 10)}
    _, rank_img = score.topk(10, dim=0)
    best = []
    for j in range(n_img):
        ranks = [(rank_img[:, j] == i).nonzero() for i in np.flatnonzero(t == j).tolist()]
        best.append(min([10] + [r.item() for r in ranks if r.numel()]))
    out.update({f"txt_r{k}": sum(b < k for b in best) / n_img for k in (1, 5, 10)})
    return out


def test_retrieval_compat_matches_uniter_on_random_scores():
    rng = np.random.default_rng(0)
    n_img = 12
    t = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 13)])   # every image has a caption
    s = rng.standard_normal((t.shape[0], n_img))                      # continuous: no ties
    ref = _uniter_reference(s, t)
    got = retrieval_recalls(s, t, uniter_compat=True)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k


def test_retrieval_true_matches_full_argsort():
    rng = np.random.default_rng(1)
    t = np.concatenate([np.arange(7), rng.integers(0, 7, 9)])
    s = rng.standard_normal((t.shape[0], 7)).astype(np.float32)
    got = retrieval_recalls(s, t, ks=(1, 2, 5))
    img_pos = np.array([np.flatnonzero(np.argsort(-s[i], kind="stable") == t[i])[0] for i in range(len(t))])
    col_pos = [np.argsort(-s[:, j], kind="stable") for j in range(7)]
    best = np.array([min(np.flatnonzero(np.isin(col_pos[j], np.flatnonzero(t == j)))) for j in range(7)])
    for k in (1, 2, 5):
        assert got[f"img_r{k}"] == pytest.approx((img_pos < k).mean())
        assert got[f"txt_r{k}"] == pytest.approx((best < k).mean())


def test_retrieval_blocked_ranking_matches_one_block(monkeypatch):
    import trainer.downstream_metrics as M
    rng = np.random.default_rng(3)
    t = np.concatenate([np.arange(5), rng.integers(0, 5, 6)])
    s = rng.standard_normal((t.shape[0], 5))
    whole = retrieval_recalls(s, t, ks=(1, 2, 3))
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 7)   # blocks of one or two rows / columns
    assert retrieval_recalls(s, t, ks=(1, 2, 3)) == whole


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_recalls(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="one per example"):
        retrieval_recalls(S33, np.array([0, 1]))
    with pytest.raises(ValueError, match="image columns"):
        retrieval_recalls(S33, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recalls(np.full((2, 2), np.nan), np.array([0, 1]))
    with pytest.raises(ValueError, match="top 10"):
        retrieval_recalls(S33, T33, ks=(1, 20), uniter_compat=True)
    with pytest.raises(ValueError, match="positive"):
        retrieval_recalls(S33, T33, ks=(0,))


# ---------------------------------------------------------------------------- referring expressions


def test_iou_pixel_convention():
    a = [0, 0, 10, 10]                                                    # pixels 0..9
    assert iou_xywh(a, [10, 0, 10, 10]) == 0.0                            # touching: pixels 10..19 share none
    assert iou_xywh(a, [9, 0, 10, 10]) == pytest.approx(10 / 190)         # one shared pixel column
    assert iou_xywh(a, [2, 3, 4, 5]) == pytest.approx(20 / 100)           # contained: I = 4*5, U = 100
    assert iou_xywh(a, [5, 5, 10, 10]) == pytest.approx(25 / 175)         # corner overlap 5x5
    assert iou_xywh(a, a) == pytest.approx(1.0)
    # Disjoint on both axes: both extents are negative (-15), so their product must not count.
    assert iou_xywh([0, 0, 5, 5], [20, 20, 5, 5]) == 0.0
    assert iou_xywh([0, 0, 5, 5], [0, 20, 5, 5]) == 0.0                   # overlap in x only


def test_iou_input_errors():
    with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
        iou_xywh([0, 0, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="no area"):
        iou_xywh([0, 0, 0, 0], [5, 5, 0, 0])


def test_re_threshold_strict_vs_not_at_exactly_half():
    gold = [[0, 0, 10, 10], [0, 0, 10, 10]]
    pred = [[0, 0, 10, 5], [0, 0, 10, 10]]                               # IoU 0.5 exactly, then 1.0
    assert iou_xywh(pred[0], gold[0]) == 0.5
    assert re_accuracy(pred, gold) == 0.5                                # UNITER: IoU > 0.5
    assert re_accuracy(pred, gold, strict=False) == 1.0                  # ALBEF: IoU >= 0.5
    with pytest.raises(ValueError, match="one per example"):
        re_accuracy(pred, gold[:1])


# ---------------------------------------------------------------------------- NLVR2


def test_nlvr2_consistency_groups_pairs_of_one_sentence():
    # (identifier, gold, prediction): the third field is the image pair, the fourth the sentence.
    rows = [("dev-1-0-0", 1, 1), ("dev-1-1-0", 0, 0), ("dev-1-2-0", 1, 0),   # sentence dev-1--0: one wrong
            ("dev-1-0-1", 0, 0), ("dev-1-1-1", 1, 1),                       # sentence dev-1--1: all right
            ("dev-2-0-0", 1, 1)]                                            # sentence dev-2--0: all right
    examples = [{"id": i, "label": g} for i, g, _ in rows]
    m = nlvr2_metrics(np.array([p for *_, p in rows]), examples)
    assert m["acc"] == pytest.approx(5 / 6)
    assert m["consistency"] == pytest.approx(2 / 3)   # grouping by the last field instead would give 3/4
    assert nlvr2_sentence_key("dev-850-0-0") == "dev-850--0"
    with pytest.raises(ValueError, match="split-set-pair-sentence"):
        nlvr2_metrics(np.array([1]), [{"id": "dev850", "label": 1}])
    with pytest.raises(ValueError, match="label"):
        nlvr2_metrics(np.array([1]), [{"id": "test1-1-0-0"}])


# ---------------------------------------------------------------------------- VCR


def test_vcr_joint_accuracy():
    examples = [{"id": "q0", "answer_label": 1, "rationale_label": 2},
                {"id": "q1", "answer_label": 0, "rationale_label": 3},
                {"id": "q2", "answer_label": 3, "rationale_label": 0}]
    qa = np.array([[0.1, 0.9, 0.0, 0.0],     # argmax 1: right
                   [0.8, 0.1, 0.0, 0.1],     # argmax 0: right
                   [0.0, 0.1, 0.7, 0.2]])    # argmax 2: wrong
    qar = np.array([[0.0, 0.1, 0.8, 0.1],    # argmax 2: right
                    [0.1, 0.6, 0.1, 0.2],    # argmax 1: wrong
                    [0.5, 0.2, 0.2, 0.1]])   # argmax 0: right
    m = vcr_metrics(qa, qar, examples)
    assert m["qa_acc"] == pytest.approx(2 / 3)
    assert m["qar_acc"] == pytest.approx(2 / 3)
    assert m["q_ar_acc"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        vcr_metrics(qa[:, :3], qar, examples)
    with pytest.raises(ValueError, match="one row per question"):
        vcr_metrics(qa[:2], qar[:2], examples)


# ---------------------------------------------------------------------------- predictions files


def _no_temp_files(folder):
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_vqa_predictions_official_format(tmp_path):
    paths = P.write_predictions("vqa", str(tmp_path), {"ids": ["262148000", "q-7"], "answers": ["yes", "2"]})
    assert paths == [str(tmp_path / "predictions.json")]
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert rows == [{"question_id": 262148000, "answer": "yes"}, {"question_id": "q-7", "answer": "2"}]
    assert P.read_predictions("vqa", str(tmp_path)) == {"ids": ["262148000", "q-7"], "answers": ["yes", "2"]}
    with pytest.raises(ValueError, match="strings"):
        P.write_vqa_predictions(str(tmp_path / "x.json"), ["1"], [3])
    _no_temp_files(tmp_path)


def test_ve_predictions_csv(tmp_path):
    P.write_predictions("ve", str(tmp_path), {"ids": ["a#0", "b,1"], "labels": [1, "neutral"]})
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["pair_id", "label"], ["a#0", "entailment"], ["b,1", "neutral"]]
    assert P.read_predictions("ve", str(tmp_path))["labels"] == ["entailment", "neutral"]
    with pytest.raises(ValueError, match="VE label"):
        P.write_predictions("ve", str(tmp_path), {"ids": ["a"], "labels": [3]})


def test_nlvr2_predictions_read_like_the_official_script(tmp_path):
    ids = ["dev-1-0-0", "dev-1-1-0", "test1-5-2-1"]
    P.write_predictions("nlvr2", str(tmp_path), {"ids": ids, "labels": [1, 0, True]})
    parsed = {}
    for line in open(tmp_path / "predictions.csv").readlines():   # as nlvr2's evaluate script reads it
        if line:
            fields = line.strip().split(",")
            parsed[fields[0]] = fields[1]
    assert parsed == {"dev-1-0-0": "True", "dev-1-1-0": "False", "test1-5-2-1": "True"}
    assert P.read_predictions("nlvr2", str(tmp_path))["labels"] == [True, False, True]
    with pytest.raises(ValueError, match="comma"):
        P.write_predictions("nlvr2", str(tmp_path), {"ids": ["a,b"], "labels": [1]})
    with pytest.raises(ValueError, match="1/True"):
        P.write_predictions("nlvr2", str(tmp_path), {"ids": ["a"], "labels": [2]})


def test_re_predictions_json(tmp_path):
    P.write_predictions("re", str(tmp_path), {"ids": ["101", "102"], "boxes": [[1, 2, 30, 40], [0.5, 0, 8, 9]],
                                              "ious": [0.75, None]})
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert rows == [{"id": "101", "box": [1.0, 2.0, 30.0, 40.0], "iou": 0.75},
                    {"id": "102", "box": [0.5, 0.0, 8.0, 9.0], "iou": None}]
    with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
        P.write_predictions("re", str(tmp_path), {"ids": ["1"], "boxes": [[1, 2, 3]]})


def test_vcr_predictions_leaderboard_csv(tmp_path):
    rng = np.random.default_rng(2)
    qa, qar = rng.standard_normal((2, 4)), rng.standard_normal((2, 16))   # answer-major 16 QA->R logits
    P.write_predictions("vcr", str(tmp_path), {"ids": ["test-0", "test-1"], "answer_scores": qa,
                                               "rationale_scores": qar})
    with open(tmp_path / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header[:5] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3"]
    assert header[5] == "rationale_conditioned_on_a0_0" and header[-1] == "rationale_conditioned_on_a3_3"
    assert len(header) == 21 and [r["annot_id"] for r in rows] == ["test-0", "test-1"]
    for q, r in enumerate(rows):
        ans = np.array([float(r[f"answer_{i}"]) for i in range(4)])
        assert ans.sum() == pytest.approx(1.0) and ans.argmax() == qa[q].argmax()
        for a in range(4):
            rat = np.array([float(r[f"rationale_conditioned_on_a{a}_{j}"]) for j in range(4)])
            assert rat.sum() == pytest.approx(1.0) and rat.argmax() == qar[q, 4 * a:4 * a + 4].argmax()
    back = P.read_predictions("vcr", str(tmp_path))
    assert back["rationale_probs"].shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"\[q, 4, 4\]"):
        P.write_predictions("vcr", str(tmp_path), {"ids": ["a"], "answer_scores": qa[:1],
                                                   "rationale_scores": qar[:1, :8]})


def test_retrieval_outputs(tmp_path):
    recalls = retrieval_recalls(S42, T42)
    paths = P.write_predictions("retrieval", str(tmp_path), {"scores": S42, "text_ids": ["c0", "c1", "c2", "c3"],
                                                             "image_ids": ["i0", "i1"], "recalls": recalls})
    assert sorted(os.path.basename(p) for p in paths) == ["ids.json", "recalls.json", "scores.npy"]
    assert all(os.path.dirname(p) == str(tmp_path) for p in paths)
    scores = np.load(tmp_path / "scores.npy", allow_pickle=False)
    assert scores.dtype == np.float16 and scores.shape == (4, 2)
    np.testing.assert_allclose(scores, S42, atol=1e-3)
    assert json.loads((tmp_path / "ids.json").read_text()) == {"texts": ["c0", "c1", "c2", "c3"],
                                                                "images": ["i0", "i1"]}
    assert json.loads((tmp_path / "recalls.json").read_text()) == pytest.approx(recalls)
    with pytest.raises(ValueError, match="float16"):
        P.write_predictions("retrieval", str(tmp_path), {"scores": np.full((1, 1), 1e6), "text_ids": ["c"],
                                                         "image_ids": ["i"], "recalls": {}})
    _no_temp_files(tmp_path)


def test_re_ious_from_gold_boxes(tmp_path):
    P.write_predictions("re", str(tmp_path / "re"), {"ids": ["1"], "boxes": [[0, 0, 10, 5]],
                                                     "gold": [[0, 0, 10, 10]]})
    assert P.read_predictions("re", str(tmp_path / "re"))["ious"] == [0.5]


def test_payload_without_a_needed_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        P.write_predictions("ve", str(tmp_path / "ve"), {"ids": ["p"], "answers": ["contradiction"]})


def test_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        P.write_predictions("gqa", str(tmp_path), {})
    with pytest.raises(ValueError, match="lacks"):
        P.write_predictions("vqa", str(tmp_path), {"ids": ["1"]})
    with pytest.raises(ValueError, match="one id per prediction"):
        P.write_predictions("vqa", str(tmp_path), {"ids": ["1", "2"], "answers": ["yes"]})
