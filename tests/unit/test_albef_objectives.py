"""ALBEF's objectives (issue 7, acceptance 1) against values computed here independently:
plain Python / NumPy in float64, loops per row, no code shared with trainer.objectives.albef."""
from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.objectives import albef

RNG = np.random.default_rng(0)


def unit_rows(n: int, d: int) -> np.ndarray:
    x = RNG.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def softmax_row(row) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def itc_by_hand(img, txt, img_m, txt_m, queue_i, queue_t, temp, alpha, offset=0):
    """Per row: soft targets from the momentum sims over [global batch | queue], then CE."""
    text_all = np.concatenate([txt_m, queue_t.T])  # [B+Q, D]
    image_all = np.concatenate([img_m, queue_i.T])
    total = 0.0
    for anchors, anchors_m, cands in ((img, img_m, text_all), (txt, txt_m, image_all)):
        loss = 0.0
        for i in range(len(anchors)):
            sims = [float(anchors[i] @ c) / temp for c in cands]
            sims_m = [float(anchors_m[offset + i] @ c) / temp for c in cands]
            p_m = softmax_row(sims_m)
            target = [alpha * p + (1 - alpha) * (1.0 if j == offset + i else 0.0) for j, p in enumerate(p_m)]
            log_p = [s - max(sims) - math.log(sum(math.exp(v - max(sims)) for v in sims)) for s in sims]
            loss += -sum(t * lp for t, lp in zip(target, log_p))
        total += loss / len(anchors)
    return total / 2


def tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_with_queue_and_soft_targets(alpha):
    b, d, q = 4, 8, 6
    img, txt, img_m, txt_m = unit_rows(b, d), unit_rows(b, d), unit_rows(b, d), unit_rows(b, d)
    queue_i, queue_t = unit_rows(q, d).T, unit_rows(q, d).T
    want = itc_by_hand(img, txt, img_m, txt_m, queue_i, queue_t, 0.07, alpha)
    t = tensors(img, txt, img_m, txt_m, queue_i, queue_t)
    t[0].requires_grad_(True)
    got = albef.itc_loss(*t, temp=torch.tensor(0.07, dtype=torch.float64), alpha=alpha)
    assert got.loss.item() == pytest.approx(want, rel=1e-10)
    assert got.sim_i2t.shape == (b, b + q)
    got.loss.backward()
    assert t[0].grad is not None and torch.isfinite(t[0].grad).all()


def test_itc_rows_of_one_rank_use_the_global_batch():
    """Rank 1 of 2 (offset 3 of a global batch of 6): its rows' positives sit at columns 3..5, and
    the two ranks' losses average to the one-process loss of the joint batch."""
    b, d, q = 3, 5, 6
    img, txt, img_m, txt_m = unit_rows(2 * b, d), unit_rows(2 * b, d), unit_rows(2 * b, d), unit_rows(2 * b, d)
    queue_i, queue_t = unit_rows(q, d).T, unit_rows(q, d).T
    temp = torch.tensor(0.1, dtype=torch.float64)
    whole = albef.itc_loss(*tensors(img, txt, img_m, txt_m, queue_i, queue_t), temp=temp, alpha=0.4).loss
    halves = [albef.itc_loss(*tensors(img[r * b:(r + 1) * b], txt[r * b:(r + 1) * b], img_m, txt_m, queue_i, queue_t),
                             temp=temp, alpha=0.4, offset=r * b).loss for r in range(2)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-12)
    want = itc_by_hand(img[b:], txt[b:], img_m, txt_m, queue_i, queue_t, 0.1, 0.4, offset=b)
    assert halves[1].item() == pytest.approx(want, rel=1e-10)


def test_temperature_is_clamped_in_place_and_keeps_its_gradient():
    temp = torch.nn.Parameter(torch.tensor(0.9))
    albef.clamp_temperature_(temp)
    assert temp.item() == pytest.approx(0.5) and temp.grad_fn is None
    feats = [torch.tensor(unit_rows(3, 4), dtype=torch.float32) for _ in range(4)]
    queue = torch.tensor(unit_rows(5, 4).T, dtype=torch.float32)
    albef.itc_loss(*feats, queue, queue, temp, alpha=0.4).loss.backward()
    assert temp.grad is not None and temp.grad.item() != 0.0
    small = torch.nn.Parameter(torch.tensor(1e-5))
    albef.clamp_temperature_(small)
    assert small.item() == pytest.approx(0.001)


def test_alpha_ramps_over_the_first_epoch():
    assert [albef.alpha_at(0.4, s, 100) for s in (0, 25, 50, 100, 250)] == \
        pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    assert albef.alpha_at(0.4, 0, 0) == 0.4  # no epoch length known: no ramp


def test_hard_negative_weights_are_the_softmax_without_same_image_pairs():
    sim = RNG.standard_normal((5, 5)) * 3
    ids = np.array([7, 3, 7, 1, 3])
    got = albef.hard_negative_weights(torch.tensor(sim), torch.tensor(ids))
    for i in range(5):
        p = softmax_row(list(sim[i]))
        want = [0.0 if ids[i] == ids[j] else p[j] for j in range(5)]
        assert got[i].tolist() == pytest.approx(want, rel=1e-6, abs=1e-12)  # zeroed, not renormalised


def test_hard_negative_weights_fall_back_when_a_row_has_nothing_to_draw():
    sim = torch.tensor([[0.0, -1e4, -1e4], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 0 underflows
    got = albef.hard_negative_weights(sim, torch.tensor([1, 2, 3]))
    assert got[0].tolist() == [0.0, 1.0, 1.0]  # uniform over the other images
    same = albef.hard_negative_weights(torch.zeros(2, 2), torch.tensor([5, 5]))  # one image only
    assert same.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # the other pair, the only choice


def test_hard_negatives_never_share_the_image_and_follow_the_weights():
    b = 6
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    sim_i2t, sim_t2i = torch.randn(b, b, generator=torch.Generator().manual_seed(1)) * 2, torch.randn(b, b)
    weights = albef.hard_negative_weights(sim_i2t, ids)
    gen = torch.Generator().manual_seed(0)
    draws = 6000
    counts = torch.zeros(b, b)
    calls = []
    real = torch.multinomial

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    with mock.patch.object(torch, "multinomial", counting):
        for _ in range(draws):
            neg_text, neg_image = albef.sample_hard_negatives(sim_i2t, sim_t2i, ids, generator=gen)
            assert not (ids[neg_text] == ids).any() and not (ids[neg_image] == ids).any()
            counts[torch.arange(b), neg_text] += 1
    assert calls == [(b, b)] * (2 * draws)  # one draw for the whole batch per direction: no loop
    expected = weights / weights.sum(1, keepdim=True)
    freq = counts / draws
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / draws))


def test_random_negatives_are_uniform_over_the_other_images_whatever_the_similarity():
    b, draws = 5, 6000
    ids = torch.tensor([0, 1, 0, 2, 3])
    sim = torch.randn(b, b, generator=torch.Generator().manual_seed(2)) * 5  # hard weights far from uniform
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(b, b)
    for _ in range(draws):
        neg_text, neg_image = albef.sample_hard_negatives(sim, sim, ids, generator=gen, hard=False)
        assert not (ids[neg_text] == ids).any() and not (ids[neg_image] == ids).any()
        counts[torch.arange(b), neg_image] += 1
    other = (ids[:, None] != ids[None, :]).float()  # [b, b]
    expected = other / other.sum(1, keepdim=True)
    assert torch.allclose(counts / draws, expected, atol=4 * math.sqrt(0.25 / draws))


def test_itm_labels_are_positives_then_two_negatives_each():
    assert albef.itm_labels(2, torch.device("cpu")).tolist() == [1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_distilled_mlm_against_hand_computed(alpha):
    n, v = 5, 7
    logits, logits_m = RNG.standard_normal((n, v)) * 2, RNG.standard_normal((n, v)) * 2
    targets = RNG.integers(0, v, n)
    want = 0.0
    for i in range(n):
        log_p = [math.log(p) for p in softmax_row(list(logits[i]))]
        teacher = softmax_row(list(logits_m[i]))
        want += (1 - alpha) * -log_p[targets[i]] + alpha * -sum(t * lp for t, lp in zip(teacher, log_p))
    want /= n
    x = torch.tensor(logits, requires_grad=True)
    got = albef.distilled_mlm_loss(x, torch.tensor(logits_m), torch.tensor(targets), alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    # d/dlogits of the mixed loss: softmax - ((1-alpha) one-hot + alpha teacher), averaged over n
    target_mix = (1 - alpha) * F.one_hot(torch.tensor(targets), v) + alpha * F.softmax(torch.tensor(logits_m), -1)
    torch.testing.assert_close(x.grad, ((F.softmax(x.detach(), -1) - target_mix) / n).to(x.grad.dtype),
                               rtol=1e-5, atol=1e-7)
