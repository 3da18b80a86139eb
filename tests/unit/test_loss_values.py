"""Every UNITER pretraining loss vs an independent per-example computation (docs/models.md).

One hand-made batch of four image-text pairs whose text lengths and region
counts all differ, so text padding, region padding and the packed
`[txt_i | img_i | pad]` layout all matter. It goes through the real collate
functions (collate_mlm, collate_mrm, collate_itm), a tiny real UNITER and the
library task functions (trainer/recipes/uniter_tasks.py: model, then objective), whose
`TaskResult` sums are checked against values this file computes on its own; the pure loss
functions (trainer/objectives/) are also fed this file's reference head outputs:

- hidden states: every example is run ALONE through the backbone (batch of 1,
  no padding, identity gather), never through the packed batch;
- masks: replayed from the collate seed with `data.masking` (collate draws per
  sample, in order); the masked region features are zeroed and
  `mask_embedding.weight[1]` added HERE (not through `img_masks`);
- heads: written out from the weights as docs/models.md ("UNITER model") states them
  (dense -> erf GELU -> LayerNorm eps 1e-12 -> tied decoder / classifier);
- losses and IPOT: explicit per-element / per-example loops following docs/models.md ("UNITER").

The library returns sums; each test asserts the documented divisor explicitly
(`losses["loss"] / n_items` = UNITER's mean, MRFR/MRC-kl `losses["loss"] = elementwise sum / D or K`).

Precision and tolerances. The model is fp64, dropout 0, eval mode, so everything
is deterministic. Alone vs packed hidden states agree to atol 1e-12: in fp64
`exp(-10000 + s)` underflows to exactly 0, so padded keys contribute nothing and
only the summation order differs. The objectives cast logits, predictions and
the OT inputs to fp32 on purpose (mixed-precision safety), so library-vs-reference
comparisons use rel 1e-6 (plus abs 1e-7 for quantities that can be near 0);
the measured gap is <= 6e-8 relative (fp32 rounding, ~6e-8 per value). `kernels.ot` on the fp64 packed batch is
compared with the fp64 loop at rel 1e-10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from data.collate import collate_itm, collate_mlm, collate_mrm
from data.masking import mask_regions, mask_tokens
from data.shards import RegionSample
from data.tokenizer import Tokenizer, load_tokenizer
from data.vocab import DEMO_VOCAB_PATH
from kernels.ot import ot_distance, wra_loss
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining
from trainer.objectives.base import TaskResult
from trainer.objectives.itm import WraConfig, itm_loss
from trainer.objectives.mlm import mlm_loss
from trainer.objectives.mrm import mrc_kl_loss, mrc_loss, mrfr_loss
from trainer.recipes import uniter_tasks

F64 = torch.float64
IMG_DIM, LABEL_DIM = 12, 7  # D, K
# (word pieces, regions) per example -> txt_lens 8, 3, 5, 11 (with [CLS]/[SEP]);
# Lt = 11, Ni = 7; with their own images (MLM, MRM) packed rows are 11, 10, 6, 16 long -> L = 16,
# three rows padded; in the ITM batch (images 0, 3, 1, 3) they are 11, 8, 12, 16 long.
SHAPES = [(6, 3), (1, 7), (3, 1), (9, 5)]
B = len(SHAPES)
MLM_PROB = MRM_PROB = 0.3
MLM_SEED = 0  # selects 3, 1, 1, 4 word pieces
MRM_SEED = 2  # masks regions [0, 1] of ex 0, [0, 3, 4, 5] of ex 1, [0] of ex 2, [0] of ex 3
ITM_SEED = 6  # images 0, 3, 1, 3: ex 1 and 2 are negatives with a different region count
WRA = WraConfig()  # weight 0.1, beta 0.5, 50 iterations, k 1 (UNITER)
LN_EPS = 1e-12
REL, ABS = 1e-6, 1e-7  # library (fp32 logits / OT) vs fp64 reference; measured <= 6e-8 rel


# ------------------------------------------------------------------ fixture

@dataclass
class Setup:
    tok: Tokenizer
    model: UniterForPretraining
    samples: list[RegionSample]


def _samples(tok: Tokenizer) -> list[RegionSample]:
    """Four hand-made pairs; soft labels: background (class 0) dominates every even row,
    odd rows have an exact 0 probability (KL term 0 there)."""
    gen = np.random.default_rng(123)
    out = []
    for i, (n_words, n_bb) in enumerate(SHAPES):
        xy = gen.random((n_bb, 2)) * 0.5
        wh = 0.1 + gen.random((n_bb, 2)) * 0.4
        boxes = np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], 1)  # [n, 7]
        soft = gen.random((n_bb, LABEL_DIM)) ** 3  # [n, K]
        soft[0::2, 0] = 3.0
        soft[1::2, 2] = 0.0
        out.append(RegionSample(
            key=f"s{i}", image_id=f"img{i}",
            input_ids=gen.integers(tok.first_random_id, tok.vocab_size, n_words).astype(np.int64),  # [T]
            img_feat=(gen.standard_normal((n_bb, IMG_DIM)) + i).astype(np.float32),  # [n, D]
            img_pos=boxes.astype(np.float32),  # [n, 7]
            soft_labels=(soft / soft.sum(1, keepdims=True)).astype(np.float32),  # [n, K]
        ))
    return out


@pytest.fixture(scope="module")
def setup() -> Setup:
    tok = load_tokenizer(DEMO_VOCAB_PATH)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      img_dim=IMG_DIM, img_label_dim=LABEL_DIM, initializer_range=0.2)
    torch.manual_seed(0)
    model = UniterForPretraining(cfg).double().eval()
    with torch.no_grad():  # non-zero biases / LN params everywhere, so a dropped term shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Setup(tok, model, _samples(tok))


def run_library(task, model, batch: dict, *args):
    """A library task function on the collated batch; features cast to the weights' dtype
    (what `UniterForPretraining.forward` does before calling it)."""
    batch = dict(batch, img_feat=batch["img_feat"].to(F64), img_pos_feat=batch["img_pos_feat"].to(F64))
    with torch.no_grad():
        return task(model, batch, *args)


def run_forward(task, model, batch: dict, *args) -> TaskResult:
    """The same task through `UniterForPretraining.forward` (casts the features itself and adds an
    exact zero to each loss): must give the very same sums as calling the task function."""
    with torch.no_grad():
        return model(batch, task, *args)


def assert_same_result(a: TaskResult, b: TaskResult) -> None:
    assert a.losses.keys() == b.losses.keys() == {"loss"}
    assert a.stats.keys() == b.stats.keys() and a.counts.keys() == b.counts.keys()
    for x, y in [*zip(a.losses.values(), b.losses.values()), *((a.stats[k], b.stats[k]) for k in a.stats),
                 *((a.counts[k], b.counts[k]) for k in a.counts)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------------ independent reference

def alone_hidden(model, ids: list[int], feat, pos) -> torch.Tensor:
    """Last hidden states of ONE unpadded example: ids [tl], feat [n, D], pos [n, 7] -> [tl + n, H]."""
    tl, n = len(ids), len(feat)
    with torch.no_grad():
        h = model.uniter(
            torch.tensor(ids, dtype=torch.long)[None],  # [1, tl]
            torch.arange(tl)[None],  # [1, tl]
            torch.as_tensor(feat, dtype=F64)[None],  # [1, n, D]
            torch.as_tensor(pos, dtype=F64)[None],  # [1, n, 7]
            torch.ones(1, tl + n, dtype=torch.long),  # no padding
            torch.arange(tl + n)[None],  # identity gather
        )
    return h[0]  # [tl + n, H]


def text_ids(tok, word_pieces) -> list[int]:
    return [tok.cls_id, *[int(t) for t in word_pieces], tok.sep_id]


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * ln.weight + ln.bias


def transform(x, dense, ln):
    """`Linear(H, H) -> GELU (erf) -> LN`."""
    y = linear(x, dense)
    return layer_norm(0.5 * y * (1 + torch.erf(y / math.sqrt(2))), ln)


def mlm_head(model, h):
    """h [H] -> [V]; decoder tied to the word embeddings, own bias."""
    p = model.cls.predictions
    return transform(h, p.transform.dense, p.transform.LayerNorm) @ model.uniter.embeddings.word_embeddings.weight.T \
        + p.bias


def mrfr_head(model, h):
    """h [H] -> [D]; `F.linear(x, img_linear.weight.t(), bias)` = x @ img_linear.weight [H, D]."""
    r = model.feat_regress
    return transform(h, r.net[0], r.net[2]) @ model.uniter.img_embeddings.img_linear.weight + r.bias


def mrc_head(model, h):
    """h [H] -> [K]."""
    net = model.region_classifier.net
    return linear(transform(h, net[0], net[2]), net[3])


def itm_head(model, h_cls):
    """[CLS] state [H] -> [2] through the pooler `tanh(Linear(h))`."""
    return linear(torch.tanh(linear(h_cls, model.uniter.pooler.dense)), model.itm_output)


def cross_entropy(z, target: int) -> float:
    """-log softmax(z)[target], z [C], scalar loop."""
    zs = z.tolist()
    return math.log(sum(math.exp(v) for v in zs)) - zs[target]


def argmax(values, start: int = 0) -> int:
    values = list(values)
    return max(range(start, len(values)), key=lambda k: values[k])


def cosine_cost(x, y, eps: float = 1e-5):
    """C = 1 - cos: x [n_x, H], y [n_y, H] -> [n_x, n_y], rows normalised by max(|v|, eps)."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1 - xn @ yn.T


def ipot_distance(C, beta: float, iterations: int) -> float:
    """IPOT of docs/models.md ("ITM and WRA"; k = 1, uniform marginals) on one unpadded example:
    C [n_x, n_y] -> trace(C T)."""
    n_x, n_y = C.shape
    sigma = torch.full((n_x, 1), 1.0 / n_x, dtype=C.dtype)  # [n_x, 1]
    T = torch.ones(n_y, n_x, dtype=C.dtype)  # [n_y, n_x]
    A = torch.exp(-C.T / beta)  # [n_y, n_x]
    for _ in range(iterations):
        Q = A * T  # [n_y, n_x]
        delta = 1 / (n_y * (Q @ sigma))  # [n_y, 1]
        sigma = (1 / (n_x * (delta.T @ Q))).T  # [n_x, 1]
        T = delta * Q * sigma.T  # [n_y, n_x]
    return torch.trace(C @ T).item()


def masked_regions(setup: Setup):
    """(h [H], target feature [D], soft labels [K]) per masked region, example by example.

    Masks replayed from MRM_SEED; masked rows zeroed, then `mask_embedding.weight[1]` added.
    """
    model, tok = setup.model, setup.tok
    rng = np.random.default_rng(MRM_SEED)
    out = []
    for s in setup.samples:
        m = mask_regions(len(s.img_feat), rng, MRM_PROB)  # [n] bool
        feat = torch.tensor(s.img_feat, dtype=F64)  # [n, D]
        feat[torch.from_numpy(m)] = model.uniter.img_embeddings.mask_embedding.weight[1].detach()
        ids = text_ids(tok, s.input_ids)
        h = alone_hidden(model, ids, feat, s.img_pos)  # [tl + n, H]
        for r in np.flatnonzero(m):
            out.append((h[len(ids) + r], s.img_feat[r].astype(np.float64), s.soft_labels[r].astype(np.float64)))
    return out


def itm_reference(setup: Setup, batch: dict):
    """Per example: (target, logits [2], OT distance) with the image collate paired with text i."""
    model, tok, samples = setup.model, setup.tok, setup.samples
    rows = []
    for i, s in enumerate(samples):
        nbb = int(batch["num_bbs"][i])
        fed = batch["img_feat"][i, :nbb].numpy()
        j = next(j for j, o in enumerate(samples) if o.img_feat.shape == fed.shape and np.array_equal(o.img_feat, fed))
        ids = text_ids(tok, s.input_ids)
        h = alone_hidden(model, ids, samples[j].img_feat, samples[j].img_pos)  # [tl + n_j, H]
        txt, img = h[: len(ids)], h[len(ids):]  # [tl, H] incl. [CLS]/[SEP], [n_j, H]
        d = ipot_distance(cosine_cost(txt, img), WRA.beta, WRA.iterations)
        rows.append((int(j == i), itm_head(model, h[0]), d))
    return rows


# ------------------------------------------------------------------ tests

def test_alone_equals_packed_hidden_states(setup):
    """Packing/padding does not change any valid state (so the per-example reference is valid)."""
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_itm(samples, np.random.default_rng(ITM_SEED), tok, neg_prob=0.5)
    assert batch["txt_lens"].tolist() == [8, 3, 5, 11]
    assert batch["num_bbs"].tolist() == [3, 5, 7, 5]  # images 0, 3, 1, 3
    assert batch["attn_masks"].shape == (B, 16) and (batch["attn_masks"] == 0).any(1).sum() == 3
    packed = run_library(lambda m, b: m.encode(b), model, batch)  # [B, L, H]
    for i in range(B):
        tl, nbb = int(batch["txt_lens"][i]), int(batch["num_bbs"][i])
        alone = alone_hidden(model, batch["input_ids"][i, :tl].tolist(), batch["img_feat"][i, :nbb],
                             batch["img_pos_feat"][i, :nbb])  # [tl + nbb, H]
        for j in range(tl + nbb):
            torch.testing.assert_close(packed[i, j], alone[j], rtol=0, atol=1e-12)


def test_mlm_loss(setup):
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_mlm(samples, np.random.default_rng(MLM_SEED), tok, mlm_prob=MLM_PROB)
    res = run_library(uniter_tasks.mlm, model, batch)
    assert_same_result(run_forward(uniter_tasks.mlm, model, batch), res)

    rng = np.random.default_rng(MLM_SEED)
    losses, correct, ref_logits, ref_labels = [], 0, [], []
    for s in samples:
        masked, labels = mask_tokens(s.input_ids, rng, tok.mask_id, tok.first_random_id, tok.vocab_size, MLM_PROB)
        h = alone_hidden(model, text_ids(tok, masked), s.img_feat, s.img_pos)  # full image (conditional masking)
        for k, label in enumerate(labels.tolist()):
            if label == -1:
                continue
            z = mlm_head(model, h[1 + k])  # [V]; +1 skips [CLS]
            losses.append(cross_entropy(z, label))
            correct += argmax(z.tolist()) == label
            ref_logits.append(z)
            ref_labels.append(label)
    n = len(losses)
    assert n == 9 and batch["n_items"] == n
    mean = sum(losses) / n  # docs/models.md, "MLM": CE over selected tokens, mean
    assert res.losses["loss"].item() / batch["n_items"] == pytest.approx(mean, rel=REL)
    assert res.stats["loss"].item() == pytest.approx(res.losses["loss"].item(), rel=1e-12)
    assert res.stats["acc"].item() == correct
    assert res.counts == {}
    # the pure loss on this file's fp64 head outputs: same formula, no fp32 rounding
    pure = mlm_loss(torch.stack(ref_logits), torch.tensor(ref_labels))  # [n, V], [n]
    assert pure.losses["loss"].item() / n == pytest.approx(mean, rel=1e-10)
    assert pure.stats["acc"].item() == correct and pure.counts == {}


def test_mrfr_loss(setup):
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_mrm(samples, np.random.default_rng(MRM_SEED), tok, mrm_prob=MRM_PROB, task="mrfr")
    res = run_library(uniter_tasks.mrfr, model, batch)
    assert_same_result(run_forward(uniter_tasks.mrfr, model, batch), res)

    regions = masked_regions(setup)
    n = len(regions)
    se_total = 0.0  # sum over n x D elements of the squared error
    preds = []
    for h, target, _ in regions:
        pred = mrfr_head(model, h).tolist()  # [D]
        se_total += sum((pred[d] - target[d]) ** 2 for d in range(IMG_DIM))
        preds.append(pred)
    assert n == 8 and batch["n_items"] == n
    # docs/models.md, "MRFR": mse(reduction='none').mean() over n_masked x D
    uniter_mean = se_total / (n * IMG_DIM)
    assert res.losses["loss"].item() / batch["n_items"] == pytest.approx(uniter_mean, rel=REL)
    assert res.losses["loss"].item() == pytest.approx(se_total / IMG_DIM, rel=REL)  # documented: se.sum() / D
    assert res.stats["loss"].item() == pytest.approx(res.losses["loss"].item(), rel=1e-12)
    # validation "MSE per region": squared L2 error per masked region
    assert res.stats["mse_per_region"].item() / n == pytest.approx(se_total / n, rel=REL)
    assert res.counts == {}
    pure = mrfr_loss(torch.tensor(preds, dtype=F64), torch.tensor(np.stack([t for _, t, _ in regions])))
    assert pure.losses["loss"].item() / n == pytest.approx(uniter_mean, rel=1e-10)
    assert pure.stats["mse_per_region"].item() == pytest.approx(se_total, rel=1e-10)


def test_mrc_loss(setup):
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_mrm(samples, np.random.default_rng(MRM_SEED), tok, mrm_prob=MRM_PROB, task="mrc")
    res = run_library(uniter_tasks.mrc, model, batch)
    assert_same_result(run_forward(uniter_tasks.mrc, model, batch), res)

    regions = masked_regions(setup)
    n = len(regions)
    losses, correct, background_top, ref_logits = [], 0, 0, []
    for h, _, soft in regions:
        target = argmax(soft, start=1)  # = argmax(soft[1:]) + 1: class 0 never a target
        background_top += argmax(soft) == 0
        z = mrc_head(model, h)  # [K]
        ref_logits.append(z)
        losses.append(cross_entropy(z, target))
        correct += argmax(z.tolist(), start=1) == target  # documented acc: background excluded on both sides
    assert background_top > 0  # the +1 shift matters on this batch
    assert batch["n_items"] == n
    assert res.losses["loss"].item() / batch["n_items"] == pytest.approx(sum(losses) / n, rel=REL)  # CE mean
    assert res.stats["loss"].item() == pytest.approx(res.losses["loss"].item(), rel=1e-12)
    assert res.stats["acc"].item() == correct
    assert res.counts == {}
    pure = mrc_loss(torch.stack(ref_logits), torch.tensor(np.stack([s for _, _, s in regions])))
    assert pure.losses["loss"].item() / n == pytest.approx(sum(losses) / n, rel=1e-10)
    assert pure.stats["acc"].item() == correct


def test_mrc_kl_loss(setup):
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_mrm(samples, np.random.default_rng(MRM_SEED), tok, mrm_prob=MRM_PROB, task="mrc-kl")
    res = run_library(uniter_tasks.mrc_kl, model, batch)
    assert_same_result(run_forward(uniter_tasks.mrc_kl, model, batch), res)

    regions = masked_regions(setup)
    n = len(regions)
    kl_total, correct, zero_probs, ref_logits = 0.0, 0, 0, []
    for h, _, soft in regions:
        ref_logits.append(mrc_head(model, h))
        z = ref_logits[-1].tolist()  # [K]
        lse = math.log(sum(math.exp(v) for v in z))
        for k in range(LABEL_DIM):  # kl_div(log q, p) elementwise = p * (log p - log q), 0 where p = 0
            p = float(soft[k])
            zero_probs += p == 0
            kl_total += 0.0 if p == 0 else p * (math.log(p) - (z[k] - lse))
        correct += argmax(z) == argmax(soft)  # documented acc: background included (UNITER's soft-target acc)
    assert zero_probs > 0
    assert batch["n_items"] == n
    uniter_mean = kl_total / (n * LABEL_DIM)  # docs/models.md, "MRC-kl": elementwise mean over n x K
    assert res.losses["loss"].item() / batch["n_items"] == pytest.approx(uniter_mean, rel=REL)
    assert res.losses["loss"].item() == pytest.approx(kl_total / LABEL_DIM, rel=REL)  # documented: kl.sum() / K
    assert res.stats["loss"].item() == pytest.approx(res.losses["loss"].item(), rel=1e-12)
    assert res.stats["kl"].item() / n == pytest.approx(kl_total / n, rel=REL)  # mean KL per region
    assert res.stats["acc"].item() == correct
    assert res.counts == {}
    # mrc_kl_loss casts the soft labels to fp32 (so p * log p is fp32): the file's fp32 tolerance
    pure = mrc_kl_loss(torch.stack(ref_logits), torch.tensor(np.stack([s for _, _, s in regions])))
    assert pure.losses["loss"].item() / n == pytest.approx(uniter_mean, rel=REL)
    assert pure.stats["kl"].item() == pytest.approx(kl_total, rel=REL)
    assert pure.stats["acc"].item() == correct


def test_itm_loss_with_wra(setup):
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_itm(samples, np.random.default_rng(ITM_SEED), tok, neg_prob=0.5)
    res = run_library(uniter_tasks.itm, model, batch, WRA)
    assert_same_result(run_forward(uniter_tasks.itm, model, batch, WRA), res)

    rows = itm_reference(setup, batch)
    targets = [t for t, _, _ in rows]
    assert batch["itm_targets"].tolist() == targets == [1, 0, 0, 1]
    ce = [cross_entropy(z, t) for t, z, _ in rows]
    d_pos = [d for t, _, d in rows if t == 1]
    d_neg = [d for t, _, d in rows if t == 0]
    ce_mean = sum(ce) / B
    ot_loss = (sum(d_pos) - sum(d_neg)) / B
    itm_total = ce_mean + WRA.weight * ot_loss
    correct = sum(argmax(z.tolist()) == t for t, z, _ in rows)

    assert batch["n_items"] == B
    assert res.losses["loss"].item() / B == pytest.approx(itm_total, rel=REL, abs=ABS)
    assert res.stats["total"].item() / B == pytest.approx(itm_total, rel=REL, abs=ABS)
    assert res.stats["loss"].item() / B == pytest.approx(ce_mean, rel=REL)
    assert res.stats["ot_loss"].item() / B == pytest.approx(ot_loss, rel=REL, abs=ABS)
    assert res.stats["acc"].item() == correct
    assert res.counts["ot_pos"].item() == len(d_pos) and res.counts["ot_neg"].item() == len(d_neg)
    assert res.stats["ot_pos"].item() / res.counts["ot_pos"].item() == pytest.approx(sum(d_pos) / len(d_pos), rel=REL)
    assert res.stats["ot_neg"].item() / res.counts["ot_neg"].item() == pytest.approx(sum(d_neg) / len(d_neg), rel=REL)

    off = run_library(uniter_tasks.itm, model, batch, WraConfig(weight=0.0))  # WRA off: plain CE sum
    assert off.losses["loss"].item() / B == pytest.approx(ce_mean, rel=REL)
    assert set(off.stats) == {"loss", "acc"} and off.counts == {}

    # the pure loss on this file's fp64 logits and IPOT distances
    logits = torch.stack([z for _, z, _ in rows])  # [B, 2]
    dist = torch.tensor([d for _, _, d in rows], dtype=F64)  # [B]
    pure = itm_loss(logits, batch["itm_targets"], dist, WRA.weight)
    assert pure.losses["loss"].item() / B == pytest.approx(itm_total, rel=1e-10, abs=1e-12)
    assert pure.stats["loss"].item() / B == pytest.approx(ce_mean, rel=1e-10)
    assert pure.stats["ot_loss"].item() / B == pytest.approx(ot_loss, rel=1e-10, abs=1e-12)
    assert pure.stats["acc"].item() == correct
    assert (pure.counts["ot_pos"].item(), pure.counts["ot_neg"].item()) == (len(d_pos), len(d_neg))
    pure_off = itm_loss(logits, batch["itm_targets"])
    assert pure_off.losses["loss"].item() / B == pytest.approx(ce_mean, rel=1e-10)
    assert set(pure_off.stats) == {"loss", "acc"} and pure_off.counts == {}


def test_ot_distance_and_wra_loss_on_packed_batch(setup):
    """kernels.ot on the fp64 padded batch (split here by index loops) vs the per-example IPOT loop."""
    model, tok, samples = setup.model, setup.tok, setup.samples
    batch = collate_itm(samples, np.random.default_rng(ITM_SEED), tok, neg_prob=0.5)
    packed = run_library(lambda m, b: m.encode(b), model, batch)  # [B, L, H]
    lt, ni, h = batch["input_ids"].size(1), batch["img_feat"].size(1), packed.size(-1)
    gen = torch.Generator().manual_seed(1)
    txt = 1e3 * torch.randn(B, lt, h, generator=gen, dtype=F64)  # [B, Lt, H]; garbage at pads
    img = 1e3 * torch.randn(B, ni, h, generator=gen, dtype=F64)  # [B, Ni, H]; garbage at pads
    txt_pad = torch.ones(B, lt, dtype=torch.bool)  # [B, Lt] True at pad
    img_pad = torch.ones(B, ni, dtype=torch.bool)  # [B, Ni] True at pad
    for i in range(B):
        tl, nbb = int(batch["txt_lens"][i]), int(batch["num_bbs"][i])
        for j in range(tl):
            txt[i, j], txt_pad[i, j] = packed[i, j], False
        for r in range(nbb):
            img[i, r], img_pad[i, r] = packed[i, tl + r], False

    dist = ot_distance(txt, img, txt_pad, img_pad, beta=WRA.beta, iterations=WRA.iterations, k=WRA.k)  # [B]
    rows = itm_reference(setup, batch)
    expected = [d for _, _, d in rows]
    assert dist.dtype == F64
    assert dist.tolist() == pytest.approx(expected, rel=1e-10)

    targets = batch["itm_targets"]  # [B]
    ot_loss, pos_sum, neg_sum, n_pos, n_neg = wra_loss(dist, targets)
    d_pos = [d for t, _, d in rows if t == 1]
    d_neg = [d for t, _, d in rows if t == 0]
    assert (n_pos.item(), n_neg.item()) == (len(d_pos), len(d_neg)) == (2, 2)
    assert pos_sum.item() == pytest.approx(sum(d_pos), rel=1e-10)
    assert neg_sum.item() == pytest.approx(sum(d_neg), rel=1e-10)
    assert ot_loss.item() == pytest.approx((sum(d_pos) - sum(d_neg)) / B, rel=1e-9, abs=1e-12)
