"""MRFR, MRC and MRC-kl objectives (docs/models.md, "Masked region modelling") against per-element reference
loops: the recipe's task functions (trainer/recipes/uniter_tasks.py) on a fake model with known
heads, the pure loss functions (trainer/objectives/mrm.py) on tensors, and a real model end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.collate import collate_mrm
from data.shards import RegionSample
from data.tokenizer import load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining
from trainer.objectives.mrm import mrc_kl_loss, mrc_loss, mrc_targets, mrfr_loss
from trainer.recipes.uniter_tasks import mrc, mrc_kl, mrfr

B, L, H, D, K = 2, 5, 3, 4, 6


class FakeModel:
    """Returns fixed hidden states; heads are fixed linear maps, so everything is known."""

    def __init__(self, hidden: torch.Tensor, w_feat: torch.Tensor, w_cls: torch.Tensor) -> None:
        self.hidden, self.w_feat, self.w_cls = hidden, w_feat, w_cls
        self.seen_masks = None

    def encode(self, batch, img_masks=None):
        self.seen_masks = img_masks
        return self.hidden

    def mrfr_features(self, h):
        return h @ self.w_feat  # [N, D]

    def mrc_logits(self, h):
        return h @ self.w_cls  # [N, K]


def _setup():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, L, H, generator=gen, dtype=torch.float64).requires_grad_()
    w_feat = torch.randn(H, D, generator=gen, dtype=torch.float64)
    w_cls = torch.randn(H, K, generator=gen, dtype=torch.float64) * 2
    soft = torch.rand(3, K, generator=gen, dtype=torch.float64)
    soft[0, 0] = 10.0  # background dominates: still never the MRC target
    soft[1, 2] = 0.0  # a zero probability: KL term 0 there
    soft = soft / soft.sum(1, keepdim=True)
    batch = {
        "img_masks": torch.tensor([[True, False], [True, True]]),
        "mrm_index": torch.tensor([3, 6, 7]),  # row 0 pos 3; row 1 pos 1 and 2
        "mrfr_targets": torch.randn(3, D, generator=gen, dtype=torch.float64).float(),
        "mrc_soft_labels": soft.float(),
        "n_items": 3,
    }
    return FakeModel(hidden, w_feat, w_cls), batch


def _rows(model, batch):
    """Gathered hidden rows and head outputs as nested Python floats (independent of torch ops)."""
    flat = model.hidden.detach().reshape(-1, H).tolist()
    h = [flat[i] for i in batch["mrm_index"].tolist()]
    wf, wc = model.w_feat.tolist(), model.w_cls.tolist()
    pred = [[sum(r[a] * wf[a][d] for a in range(H)) for d in range(D)] for r in h]
    logits = [[sum(r[a] * wc[a][k] for a in range(H)) for k in range(K)] for r in h]
    return pred, logits


def test_mrfr_matches_elementwise_loop_and_uniter_mean():
    model, batch = _setup()
    res = mrfr(model, batch)
    assert model.seen_masks is batch["img_masks"]
    pred, _ = _rows(model, batch)
    tgt = batch["mrfr_targets"].tolist()
    n = batch["n_items"]
    se = [[(pred[r][d] - tgt[r][d]) ** 2 for d in range(D)] for r in range(n)]
    total = sum(sum(row) for row in se)
    assert res.losses["loss"].item() == pytest.approx(total / D, rel=1e-6)
    assert res.stats["loss"].item() == pytest.approx(total / D, rel=1e-6)
    assert res.stats["mse_per_region"].item() == pytest.approx(total, rel=1e-6)  # sum_r sum_d se
    assert res.stats["mse_per_region"].item() == pytest.approx(D * res.stats["loss"].item(), rel=1e-6)
    # losses["loss"] / N is UNITER's loss: mse(reduction='none').mean() over N * img_dim elements
    uniter = F.mse_loss(torch.tensor(pred), torch.tensor(tgt, dtype=torch.float64), reduction="none").mean()
    assert res.losses["loss"].item() / n == pytest.approx(uniter.item(), rel=1e-6)
    assert res.losses["loss"].item() / n == pytest.approx(total / (n * D), rel=1e-6)
    assert not res.stats["loss"].requires_grad and res.losses["loss"].requires_grad
    assert res.losses["loss"].dtype == torch.float32


def test_mrc_target_skips_background_and_ce_matches_loop():
    model, batch = _setup()
    res = mrc(model, batch)
    _, logits = _rows(model, batch)
    soft = batch["mrc_soft_labels"].tolist()
    assert max(range(K), key=lambda k: soft[0][k]) == 0  # background is the largest in row 0
    targets = [max(range(1, K), key=lambda k: soft[r][k]) for r in range(3)]
    assert 0 not in targets
    ce = acc = 0.0
    for r, t in enumerate(targets):
        lse = math.log(sum(math.exp(z) for z in logits[r]))
        ce += lse - logits[r][t]
        # UNITER's validation accuracy for MRC ignores background on both sides.
        acc += float(max(range(1, K), key=lambda k: logits[r][k]) == t)
    assert res.losses["loss"].item() == pytest.approx(ce, rel=1e-6)
    assert res.stats["loss"].item() == pytest.approx(ce, rel=1e-6)
    assert res.stats["acc"].item() == acc
    assert set(res.stats) == {"loss", "acc"}


def test_mrc_kl_matches_loop_and_uniter_mean():
    model, batch = _setup()
    res = mrc_kl(model, batch)
    _, logits = _rows(model, batch)
    soft = batch["mrc_soft_labels"].tolist()
    n = batch["n_items"]
    kl_total, per_region, acc = 0.0, [], 0.0
    for r in range(n):
        lse = math.log(sum(math.exp(z) for z in logits[r]))
        terms = [0.0 if p == 0 else p * (math.log(p) - (logits[r][k] - lse)) for k, p in enumerate(soft[r])]
        per_region.append(sum(terms))
        kl_total += sum(terms)
        # UNITER's MRC-kl accuracy: argmax of the prediction vs argmax of the soft
        # labels, background included (compute_accuracy_for_soft_targets).
        target = max(range(K), key=lambda k: soft[r][k])
        acc += float(max(range(K), key=lambda k: logits[r][k]) == target)
    assert soft[1][2] == 0.0
    # the exact identities documented in trainer/objectives/mrm.py:
    #   loss = kl.sum() / K;  loss / N = UNITER's kl_div(reduction='none').mean() over N * K;
    #   stats["kl"] = kl.sum() = K * loss;  stats["kl"] / N = mean KL divergence per region
    assert res.losses["loss"].item() == pytest.approx(kl_total / K, rel=1e-6)
    uniter = F.kl_div(F.log_softmax(torch.tensor(logits), -1), torch.tensor(soft), reduction="none").mean()
    assert res.losses["loss"].item() / n == pytest.approx(uniter.item(), rel=1e-6)
    assert res.stats["loss"].item() == pytest.approx(res.losses["loss"].item(), rel=1e-7)
    assert res.stats["kl"].item() == pytest.approx(kl_total, rel=1e-6)
    assert res.stats["kl"].item() == pytest.approx(K * res.losses["loss"].item(), rel=1e-6)
    assert res.stats["kl"].item() / n == pytest.approx(sum(per_region) / n, rel=1e-6)
    assert res.stats["acc"].item() == acc


def test_gradient_reaches_only_masked_positions():
    for task in (mrfr, mrc, mrc_kl):
        model, batch = _setup()
        res = task(model, batch)
        assert set(res.losses) == {"loss"}
        res.losses["loss"].backward()
        touched = model.hidden.grad.reshape(-1, H).abs().sum(-1).nonzero().flatten().tolist()
        assert touched == batch["mrm_index"].tolist(), task.__name__


def test_pure_losses_on_tensors_equal_the_task_functions():
    """The loss functions alone, fed the head outputs of the masked regions, give the task's result."""
    model, batch = _setup()
    pred, logits = (torch.tensor(x, dtype=torch.float32) for x in _rows(model, batch))  # [N, D], [N, K]
    soft = batch["mrc_soft_labels"]
    assert mrc_targets(soft).tolist() == [max(range(1, K), key=lambda k: r[k]) for r in soft.tolist()]
    for task, pure in ((mrfr, mrfr_loss(pred, batch["mrfr_targets"])), (mrc, mrc_loss(logits, soft)),
                       (mrc_kl, mrc_kl_loss(logits, soft))):
        res = task(model, batch)
        assert res.losses.keys() == pure.losses.keys() == {"loss"}, task.__name__
        assert res.stats.keys() == pure.stats.keys() and res.counts == pure.counts == {}, task.__name__
        assert res.losses["loss"].item() == pytest.approx(pure.losses["loss"].item(), rel=1e-6), task.__name__
        for k in res.stats:
            assert res.stats[k].item() == pytest.approx(pure.stats[k].item(), rel=1e-6), (task.__name__, k)


# ------------------------------------------------------------ real model, end to end

def _samples(img_dim: int, label_dim: int) -> list[RegionSample]:
    gen = np.random.default_rng(0)
    out = []
    for i, (n_words, n_bb) in enumerate([(4, 3), (1, 6), (7, 2)]):
        soft = gen.random((n_bb, label_dim)).astype(np.float32) ** 3
        out.append(RegionSample(
            key=f"s{i}", image_id=f"img{i}",
            input_ids=gen.integers(5, 100, size=n_words).astype(np.int64),
            img_feat=gen.standard_normal((n_bb, img_dim)).astype(np.float32),
            img_pos=gen.random((n_bb, 7)).astype(np.float32),
            soft_labels=soft / soft.sum(1, keepdims=True),
        ))
    return out


def test_real_model_runs_all_three_end_to_end():
    tok = load_tokenizer(DEMO_VOCAB_PATH)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, img_dim=16, img_label_dim=9)
    torch.manual_seed(0)
    model = UniterForPretraining(cfg)
    samples = _samples(cfg.img_dim, cfg.img_label_dim)
    batch = collate_mrm(samples, np.random.default_rng(1), tok, mrm_prob=0.3)
    mask_w = model.uniter.img_embeddings.mask_embedding.weight
    for task in (mrfr, mrc, mrc_kl):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same dropout masks for both calls
        res = model(batch, task)  # the forward the engine runs: task function + an exact zero
        torch.manual_seed(1)
        with torch.no_grad():
            direct = task(model, batch)
        assert set(res.losses) == {"loss"}
        assert torch.equal(res.losses["loss"], direct.losses["loss"]), task.__name__
        assert torch.isfinite(res.losses["loss"]) and res.losses["loss"].item() > 0
        assert all(torch.isfinite(v) for v in res.stats.values())
        res.losses["loss"].backward()
        assert mask_w.grad is not None and torch.isfinite(mask_w.grad).all()
        assert mask_w.grad[1].abs().sum() > 0, task.__name__  # the mask embedding is learned
        assert (mask_w.grad[0] == 0).all(), task.__name__  # row 0 is never read
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads)

    # no leak: the masked regions' original features cannot reach the encoder
    model.eval()
    changed = _samples(cfg.img_dim, cfg.img_label_dim)
    masks = batch["img_masks"]
    for i, s in enumerate(changed):
        s.img_feat[masks[i, : len(s.img_feat)].numpy()] += 5.0
    other = collate_mrm(changed, np.random.default_rng(1), tok, mrm_prob=0.3)
    assert torch.equal(other["img_masks"], masks)
    with torch.no_grad():
        a = model.encode(batch, img_masks=batch["img_masks"])
        b = model.encode(other, img_masks=other["img_masks"])
    keep = batch["attn_masks"].bool()
    assert torch.equal(a[keep], b[keep])
    assert not torch.equal(batch["mrfr_targets"], other["mrfr_targets"])
