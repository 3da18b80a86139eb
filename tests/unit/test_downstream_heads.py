"""Downstream heads and losses (docs/downstream.md) recomputed by hand on tiny tensors (CPU).

Every expected value is rebuilt here from the parameters with plain arithmetic (matmuls, erf,
explicit LayerNorm/softmax loops), not by calling the modules under test.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.config import ModelConfig
from trainer.models.downstream import HeadConfig, UniterForFinetuning
from trainer.models.pretrain import UniterForPretraining
from trainer.objectives.downstream import (
    prediction_function,
    re_rank_negatives,
    re_train,
    training_function,
)

TINY = ModelConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, img_dim=8, img_label_dim=9,
)
H = TINY.hidden_size
HEADS = {
    "vqa": HeadConfig("vqa", num_answers=5),
    "ve": HeadConfig("ve"),
    "retrieval": HeadConfig("retrieval"),
    "nlvr2-paired": HeadConfig("nlvr2", nlvr2_variant="paired"),
    "nlvr2-triplet": HeadConfig("nlvr2", nlvr2_variant="triplet"),
    "nlvr2-paired-attn": HeadConfig("nlvr2"),
    "re-cls": HeadConfig("re"),
    "re-rank-mlp2": HeadConfig("re", re_mlp=2, re_loss="rank"),
    "vcr": HeadConfig("vcr"),
}


# ---------------------------------------------------------------- helpers

def randomize_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter non-trivial (LayerNorm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = p.dim() == 1 and any(isinstance(m, nn.LayerNorm) and m.weight is p for m in model.modules())
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_gain else 0.0))
    return model


def make_batch(cfg: ModelConfig = TINY, txt_lens: Sequence[int] = (5, 3), num_bbs: Sequence[int] = (2, 4),
               seed: int = 2) -> Dict[str, Tensor]:
    """A collated batch laid out as UNITER's collate does (text, then regions, then pads)."""
    g = torch.Generator().manual_seed(seed)
    b, lt, ni = len(txt_lens), max(txt_lens), max(num_bbs)
    length = max(t + n for t, n in zip(txt_lens, num_bbs))
    ids = torch.zeros(b, lt, dtype=torch.long)
    feat = torch.zeros(b, ni, cfg.img_dim)
    pos = torch.zeros(b, ni, 7)
    gather = torch.arange(length).repeat(b, 1)  # [B, L]
    attn = torch.zeros(b, length, dtype=torch.long)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        ids[i, :t] = torch.randint(1, cfg.vocab_size, (t,), generator=g)
        feat[i, :n] = torch.randn(n, cfg.img_dim, generator=g)
        pos[i, :n] = torch.rand(n, 7, generator=g)
        gather[i, t:t + n] = torch.arange(lt, lt + n)
        attn[i, :t + n] = 1
    return {"input_ids": ids, "position_ids": torch.arange(lt)[None], "img_feat": feat, "img_pos_feat": pos,
            "attn_masks": attn, "gather_index": gather,
            "txt_lens": torch.tensor(txt_lens), "num_bbs": torch.tensor(num_bbs)}


def lin(x: Tensor, mod: nn.Linear) -> Tensor:
    return x @ mod.weight.T + mod.bias


def layer_norm(x: Tensor, mod: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-12) * mod.weight + mod.bias


def gelu_erf(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def pool(model: UniterForFinetuning, hidden: Tensor) -> Tensor:
    return torch.tanh(lin(hidden[:, 0], model.uniter.pooler.dense))  # [B, H]


def model_for(name: str, seed: int = 0) -> UniterForFinetuning:
    return randomize_(UniterForFinetuning(TINY, HEADS[name]), seed).eval()


# ---------------------------------------------------------------- config, names, init

def test_head_config_validation_and_ve_default():
    assert HeadConfig("ve").num_answers == 3
    assert HeadConfig("vqa").num_answers == 3129
    for kwargs in ({"task": "gqa"}, {"task": "ve", "num_answers": 10}, {"task": "vqa", "num_answers": 0},
                   {"task": "nlvr2", "nlvr2_variant": "pair"}, {"task": "re", "re_mlp": 3},
                   {"task": "re", "re_loss": "hinge"}, {"task": "vcr", "vcr_extra_words": -1}):
        with pytest.raises(ValueError):
            HeadConfig(**kwargs)


EXPECTED_HEAD_SHAPES = {
    "vqa": {"vqa_output.0.weight": (2 * H, H), "vqa_output.0.bias": (2 * H,), "vqa_output.2.weight": (2 * H,),
            "vqa_output.2.bias": (2 * H,), "vqa_output.3.weight": (5, 2 * H), "vqa_output.3.bias": (5,)},
    "retrieval": {"itm_output.weight": (2, H), "itm_output.bias": (2,), "rank_output.weight": (1, H),
                  "rank_output.bias": (1,)},
    "nlvr2-paired": {"nlvr2_output.weight": (2, 2 * H), "nlvr2_output.bias": (2,)},
    "nlvr2-triplet": {"nlvr2_output.weight": (2, H), "nlvr2_output.bias": (2,)},
    "nlvr2-paired-attn": {
        **{f"attn{i}.{k}": s for i in (1, 2) for k, s in (("in_proj_weight", (3 * H, H)), ("in_proj_bias", (3 * H,)),
                                                         ("out_proj.weight", (H, H)), ("out_proj.bias", (H,)))},
        "fc.0.weight": (H, 2 * H), "fc.0.bias": (H,), "attn_pool.fc.0.weight": (1, H), "attn_pool.fc.0.bias": (1,),
        "nlvr2_output.weight": (2, 2 * H), "nlvr2_output.bias": (2,)},
    "re-cls": {"re_output.weight": (1, H), "re_output.bias": (1,)},
    "re-rank-mlp2": {"re_output.0.weight": (H, H), "re_output.0.bias": (H,), "re_output.2.weight": (H,),
                     "re_output.2.bias": (H,), "re_output.3.weight": (1, H), "re_output.3.bias": (1,)},
    "vcr": {"vcr_output.0.weight": (2 * H, H), "vcr_output.0.bias": (2 * H,), "vcr_output.2.weight": (2 * H,),
            "vcr_output.2.bias": (2 * H,), "vcr_output.3.weight": (2, 2 * H), "vcr_output.3.bias": (2,)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_HEAD_SHAPES))
def test_head_keys_are_uniters(name):
    model = UniterForFinetuning(TINY, HEADS[name])
    heads = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("uniter.")}
    assert heads == EXPECTED_HEAD_SHAPES[name]
    backbone = UniterForPretraining(TINY).uniter.state_dict()
    ours = model.uniter.state_dict()
    assert list(ours) == list(backbone)
    types = ours["embeddings.token_type_embeddings.weight"].shape[0]
    words = ours["embeddings.word_embeddings.weight"].shape[0]
    assert types == {"nlvr2": 3, "vcr": 4}.get(HEADS[name].task, 2)
    assert words == TINY.vocab_size + (81 if name == "vcr" else 0)


def test_head_activations_are_uniters():
    vqa = UniterForFinetuning(TINY, HEADS["vqa"]).vqa_output
    vcr = UniterForFinetuning(TINY, HEADS["vcr"]).vcr_output
    assert isinstance(vqa[1], nn.GELU) and vqa[1].approximate == "none"
    assert isinstance(vcr[1], nn.ReLU)


def test_uniter_init_on_heads_and_xavier_in_proj():
    torch.manual_seed(0)
    model = UniterForFinetuning(replace_hidden(256), HeadConfig("nlvr2"))
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("uniter.")]
    assert any(m is model.attn1.out_proj for m in linears)
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if m.weight.numel() >= 256:
            assert abs(m.weight.std().item() - 0.02) < 0.004
    for attn in (model.attn1, model.attn2):
        bound = math.sqrt(6.0 / (256 + 3 * 256))  # xavier-uniform on [3H, H]
        assert attn.in_proj_weight.abs().max() <= bound
        assert abs(attn.in_proj_weight.std().item() - bound / math.sqrt(3)) < 0.01
        assert torch.equal(attn.in_proj_bias, torch.zeros_like(attn.in_proj_bias))
    vqa = UniterForFinetuning(TINY, HEADS["vqa"]).vqa_output[2]
    assert torch.equal(vqa.weight, torch.ones_like(vqa.weight)) and torch.equal(vqa.bias, torch.zeros_like(vqa.bias))
    vcr = UniterForFinetuning(TINY, HEADS["vcr"])
    extra = vcr.uniter.embeddings.word_embeddings.weight[TINY.vocab_size:]
    assert abs(extra.std().item() - 0.02) < 0.004


def replace_hidden(h: int) -> ModelConfig:
    return replace(TINY, hidden_size=h, intermediate_size=2 * h)


# ---------------------------------------------------------------- type ids

def test_type_ids_absent_path_is_bit_identical():
    pre = randomize_(UniterForPretraining(TINY)).eval()
    fine = UniterForFinetuning(TINY, HEADS["vqa"]).eval()
    fine.uniter.load_state_dict(pre.uniter.state_dict())
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(pre.encode(batch), fine.encode(batch))
        # The text embedding still adds the constant row 0 (old ops, same bits).
        e = fine.uniter.embeddings
        ids, pos = batch["input_ids"], batch["position_ids"]
        old = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0])
        assert torch.equal(e(ids, pos), old)
        # Explicit type ids equal to the defaults give the same values (a lookup, not the same ops).
        typed = dict(batch, txt_type_ids=torch.zeros_like(ids),
                     img_type_ids=torch.ones(batch["img_feat"].shape[:2], dtype=torch.long))
        torch.testing.assert_close(fine.encode(typed), pre.encode(batch), atol=1e-6, rtol=0)


def embeddings_by_hand(model: UniterForFinetuning, batch: Dict[str, Tensor], txt_types: Tensor,
                       img_types: Tensor) -> tuple[Tensor, Tensor]:
    e, ie = model.uniter.embeddings, model.uniter.img_embeddings
    types = e.token_type_embeddings.weight
    lt = batch["input_ids"].shape[1]
    txt = layer_norm(e.word_embeddings.weight[batch["input_ids"]] + e.position_embeddings.weight[:lt]
                     + types[txt_types], e.LayerNorm)  # [B, Lt, H]
    feat = layer_norm(lin(batch["img_feat"], ie.img_linear), ie.img_layer_norm)
    pos = layer_norm(lin(batch["img_pos_feat"], ie.pos_linear), ie.pos_layer_norm)
    img = layer_norm(feat + pos + types[img_types], ie.LayerNorm)  # [B, Ni, H]
    return txt, img


def encoder_input(model: UniterForFinetuning, batch: Dict[str, Tensor]) -> Tensor:
    captured = {}
    handle = model.uniter.encoder.register_forward_pre_hook(lambda mod, args: captured.update(emb=args[0]))
    with torch.no_grad():
        model.encode(batch)
    handle.remove()
    return captured["emb"]  # [B, L, H]


def test_vcr_txt_type_ids_index_rows_2_and_3():
    model = model_for("vcr")
    batch = make_batch(txt_lens=(6, 5), num_bbs=(2, 3))
    txt_types = torch.tensor([[0, 0, 2, 2, 3, 3], [0, 2, 2, 3, 3, 0]])
    batch["txt_type_ids"] = txt_types
    emb = encoder_input(model, batch)
    with torch.no_grad():
        txt, img = embeddings_by_hand(model, batch, txt_types, torch.ones(2, 3, dtype=torch.long))
        # Without the type ids every text slot would use row 0: rows 2/3 must make a difference.
        plain = encoder_input(model, {k: v for k, v in batch.items() if k != "txt_type_ids"})
    for i, (t, n) in enumerate(((6, 2), (5, 3))):
        torch.testing.assert_close(emb[i, :t], txt[i, :t], atol=1e-5, rtol=0)
        torch.testing.assert_close(emb[i, t:t + n], img[i, :n], atol=1e-5, rtol=0)
    assert not torch.allclose(emb[0, 2:6], plain[0, 2:6])
    torch.testing.assert_close(emb[0, :2], plain[0, :2], atol=1e-6, rtol=0)


def test_nlvr2_triplet_img_type_ids_index_row_2():
    model = model_for("nlvr2-triplet")
    batch = make_batch(txt_lens=(4, 3), num_bbs=(4, 2))
    img_types = torch.tensor([[1, 1, 2, 2], [1, 2, 0, 0]])
    batch["img_type_ids"] = img_types
    emb = encoder_input(model, batch)
    with torch.no_grad():
        txt, img = embeddings_by_hand(model, batch, torch.zeros(2, 4, dtype=torch.long), img_types)
    for i, (t, n) in enumerate(((4, 4), (3, 2))):
        torch.testing.assert_close(emb[i, :t], txt[i, :t], atol=1e-5, rtol=0)
        torch.testing.assert_close(emb[i, t:t + n], img[i, :n], atol=1e-5, rtol=0)


def test_type_ids_shape_mismatch_is_a_value_error():
    model = model_for("vcr")
    batch = make_batch()
    with pytest.raises(ValueError, match="txt_type_ids"):
        model.encode(dict(batch, txt_type_ids=torch.zeros(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="img_type_ids"):
        model.encode(dict(batch, img_type_ids=torch.zeros(2, 1, dtype=torch.long)))


# ---------------------------------------------------------------- VQA / VE

def vqa_head_by_hand(model: UniterForFinetuning, pooled: Tensor) -> Tensor:
    head = model.vqa_output
    return lin(layer_norm(gelu_erf(lin(pooled, head[0])), head[2]), head[3])


@pytest.mark.parametrize("name", ["vqa", "ve"])
def test_vqa_logits_loss_and_score(name):
    model = model_for(name)
    batch = make_batch(txt_lens=(5, 3, 4), num_bbs=(2, 4, 3))
    a = model.head.num_answers
    targets = torch.zeros(3, a)
    targets[0, 1], targets[0, 2], targets[1, 0], targets[2, a - 1] = 1.0, 0.3, 0.6, 0.9
    batch["targets"] = targets
    with torch.no_grad():
        hidden = model.encode(batch)
        logits = vqa_head_by_hand(model, pool(model, hidden))  # [B, A]
        result = model(batch, training_function(model.head))
        predicted = model(batch, prediction_function(model.head))
    torch.testing.assert_close(predicted, logits, atol=1e-5, rtol=0)
    # UNITER's reduction: BCE mean over all elements x A; ours is a sum per example over A,
    # so the run's division by B (n_items) gives the same number.
    mean_times_a = F.binary_cross_entropy_with_logits(logits, targets) * a
    torch.testing.assert_close(result.losses["loss"] / 3, mean_times_a, atol=1e-5, rtol=1e-5)
    expected_score = sum(targets[i, logits[i].argmax()] for i in range(3))
    torch.testing.assert_close(result.stats["score"], expected_score)
    assert not result.stats["loss"].requires_grad


# ---------------------------------------------------------------- retrieval

def test_retrieval_hinge_and_acc():
    model = model_for("retrieval")
    batch = make_batch(txt_lens=(5, 3, 4, 2, 6, 3), num_bbs=(2, 4, 3, 1, 2, 2))
    batch["sample_size"] = 3
    with torch.no_grad():
        s = lin(pool(model, model.encode(batch)), model.rank_output)[:, 0]  # [R]
        result = model(batch, training_function(model.head))
        raw = model(batch, prediction_function(model.head))
    torch.testing.assert_close(raw, s, atol=1e-6, rtol=0)  # raw, no sigmoid
    loss, acc = 0.0, 0
    for group in range(2):
        p = torch.sigmoid(s[3 * group])
        for j in (1, 2):
            q = torch.sigmoid(s[3 * group + j])
            loss += max(0.0, 0.2 + q.item() - p.item())
            acc += int(p > q)
    assert result.losses["loss"].item() == pytest.approx(loss, abs=1e-6)
    assert result.stats["acc"].item() == acc


def test_retrieval_rejects_bad_sample_size():
    model = model_for("retrieval")
    batch = make_batch(txt_lens=(5, 3, 4, 2), num_bbs=(2, 4, 3, 1))
    for bad in (3, torch.tensor(2), 1):
        with pytest.raises(ValueError, match="sample_size"):
            model(dict(batch, sample_size=bad), training_function(model.head))


# ---------------------------------------------------------------- NLVR2

def test_nlvr2_paired_uses_interleaved_rows():
    model = model_for("nlvr2-paired")
    hidden = torch.randn(4, 6, H)  # rows: ex0-L, ex0-R, ex1-L, ex1-R
    masks = torch.ones(4, 6, dtype=torch.long)
    w, b = model.nlvr2_output.weight, model.nlvr2_output.bias
    with torch.no_grad():
        p = pool(model, hidden)  # [4, H]
        out = model.nlvr2_logits(hidden, masks)
        expected = torch.stack([w[:, :H] @ p[2 * i] + w[:, H:] @ p[2 * i + 1] + b for i in range(2)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        # Left/right of example 0 swapped: the two halves of the weight trade places.
        swapped = model.nlvr2_logits(hidden[[1, 0, 2, 3]], masks)
        torch.testing.assert_close(swapped[0], w[:, :H] @ p[1] + w[:, H:] @ p[0] + b, atol=1e-5, rtol=0)
        torch.testing.assert_close(swapped[1], out[1], atol=0, rtol=0)
        assert not torch.allclose(swapped[0], out[0])
        # Whole examples swapped: the logits rows swap.
        torch.testing.assert_close(model.nlvr2_logits(hidden[[2, 3, 0, 1]], masks), out[[1, 0]], atol=1e-6, rtol=0)


def test_nlvr2_triplet_logits():
    model = model_for("nlvr2-triplet")
    hidden = torch.randn(3, 5, H)
    with torch.no_grad():
        out = model.nlvr2_logits(hidden, torch.ones(3, 5, dtype=torch.long))
        torch.testing.assert_close(out, lin(pool(model, hidden), model.nlvr2_output), atol=1e-5, rtol=0)


def mha_by_hand(attn: nn.MultiheadAttention, query: Tensor, kv: Tensor, key_pad: Tensor, heads: int) -> Tensor:
    """query [L, H], kv [S, H], key_pad [S] (True = pad) -> [L, H]; torch MHA's formula."""
    d = H // heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = (query @ wq.T + bq) * d ** -0.5
    k, v = kv @ wk.T + bk, kv @ wv.T + bv
    outs = []
    for head in range(heads):
        cols = slice(head * d, (head + 1) * d)
        scores = (q[:, cols] @ k[:, cols].T).masked_fill(key_pad[None], float("-inf"))  # [L, S]
        outs.append(torch.softmax(scores, -1) @ v[:, cols])
    return lin(torch.cat(outs, -1), attn.out_proj)


def attn_pool_by_hand(model: UniterForFinetuning, x: Tensor, pad: Tensor) -> Tensor:
    """x [L, H], pad [L] -> [H]."""
    score = torch.relu(lin(x, model.attn_pool.fc[0]))[:, 0] + pad.float() * -1e4  # [L]
    weight = torch.exp(score - score.max())
    return (weight / weight.sum()) @ x


def paired_attn_by_hand(model: UniterForFinetuning, hidden: Tensor, masks: Tensor) -> Tensor:
    rows = []
    for i in range(hidden.shape[0] // 2):
        left, right = hidden[2 * i], hidden[2 * i + 1]
        lpad, rpad = masks[2 * i] == 0, masks[2 * i + 1] == 0
        l2r = mha_by_hand(model.attn1, left, right, rpad, TINY.num_attention_heads)
        r2l = mha_by_hand(model.attn2, right, left, lpad, TINY.num_attention_heads)
        lo = torch.relu(lin(torch.cat([l2r, left], -1), model.fc[0]))
        ro = torch.relu(lin(torch.cat([r2l, right], -1), model.fc[0]))
        pooled = torch.cat([attn_pool_by_hand(model, lo, lpad), attn_pool_by_hand(model, ro, rpad)])
        rows.append(lin(pooled, model.nlvr2_output))
    return torch.stack(rows)  # [n, 2]


def test_nlvr2_paired_attn_by_hand_with_pads():
    model = model_for("nlvr2-paired-attn")
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 7, H, generator=g)
    masks = torch.zeros(4, 7, dtype=torch.long)
    for row, valid in enumerate((7, 4, 5, 6)):
        masks[row, :valid] = 1
    with torch.no_grad():
        out = model.nlvr2_logits(hidden, masks)
        torch.testing.assert_close(out, paired_attn_by_hand(model, hidden, masks), atol=1e-5, rtol=0)
        # Pads do not matter; the other example does not either; left/right order does.
        noisy = hidden.clone()
        noisy[1, 4:] = 50.0
        noisy[2:] = torch.randn(2, 7, H, generator=g)
        torch.testing.assert_close(model.nlvr2_logits(noisy, masks)[0], out[0], atol=1e-5, rtol=0)
        swapped = model.nlvr2_logits(hidden[[1, 0, 2, 3]], masks[[1, 0, 2, 3]])
        torch.testing.assert_close(swapped, paired_attn_by_hand(model, hidden[[1, 0, 2, 3]], masks[[1, 0, 2, 3]]),
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(swapped[0], out[0])


def test_nlvr2_training_loss_and_acc():
    model = model_for("nlvr2-paired")
    batch = make_batch(txt_lens=(5, 5, 3, 3), num_bbs=(2, 4, 3, 1))
    batch["targets"] = torch.tensor([1, 0])
    with torch.no_grad():
        p = pool(model, model.encode(batch))
        logits = lin(p.reshape(2, 2 * H), model.nlvr2_output)
        result = model(batch, training_function(model.head))
    expected = sum(-torch.log_softmax(logits[i], -1)[t] for i, t in enumerate((1, 0)))
    torch.testing.assert_close(result.losses["loss"], expected, atol=1e-5, rtol=0)
    assert result.stats["acc"].item() == int(logits[0].argmax() == 1) + int(logits[1].argmax() == 0)


# ---------------------------------------------------------------- RE

def re_case():
    txt_lens, num_bbs = torch.tensor([3, 5, 2]), torch.tensor([4, 2, 3])
    hidden = torch.randn(3, 9, H, generator=torch.Generator().manual_seed(7))
    obj_masks = torch.arange(4)[None] >= num_bbs[:, None]  # [n, 4] True = pad
    return hidden, txt_lens, num_bbs, obj_masks


def re_scores_by_hand(model: UniterForFinetuning, hidden, txt_lens, num_bbs) -> Tensor:
    scores = torch.full((3, 4), -1e4)
    for i in range(3):
        t, n = int(txt_lens[i]), int(num_bbs[i])
        region = hidden[i, t:t + n]  # [nbb, H]
        head = model.re_output
        s = lin(region, head) if isinstance(head, nn.Linear) else \
            lin(layer_norm(gelu_erf(lin(region, head[0])), head[2]), head[3])
        scores[i, :n] = s[:, 0]
    return scores


@pytest.mark.parametrize("name", ["re-cls", "re-rank-mlp2"])
def test_re_scores_regions_only_with_pads_at_minus_1e4(name):
    model = model_for(name)
    hidden, txt_lens, num_bbs, obj_masks = re_case()
    with torch.no_grad():
        scores = model.re_scores(hidden, txt_lens, obj_masks)
        torch.testing.assert_close(scores, re_scores_by_hand(model, hidden, txt_lens, num_bbs), atol=1e-5, rtol=0)
        assert (scores[obj_masks] == -1e4).all()
        # Even when every real region scores low, a pad never wins the argmax.
        last = model.re_output if isinstance(model.re_output, nn.Linear) else model.re_output[3]
        last.bias.fill_(-5000.0)
        low = model.re_scores(hidden, txt_lens, obj_masks)
    assert (low[~obj_masks] < -4000).all()
    assert (low.argmax(1) < num_bbs).all()


def test_re_cls_loss_and_acc():
    model = model_for("re-cls")
    batch = make_batch(txt_lens=(3, 5, 2), num_bbs=(4, 2, 3))
    batch["obj_masks"] = torch.arange(4)[None] >= batch["num_bbs"][:, None]
    batch["targets"] = torch.tensor([[2], [1], [0]])  # UNITER's [n, 1] layout is accepted
    with torch.no_grad():
        hidden = model.encode(batch)
        scores = re_scores_by_hand(model, hidden, batch["txt_lens"], batch["num_bbs"])
        result = model(batch, training_function(model.head))
        predicted = model(batch, prediction_function(model.head))
    torch.testing.assert_close(predicted, scores, atol=1e-5, rtol=0)
    targets = (2, 1, 0)
    expected = sum(torch.logsumexp(scores[i], 0) - scores[i, t] for i, t in enumerate(targets))
    torch.testing.assert_close(result.losses["loss"], expected, atol=1e-4, rtol=0)
    assert result.stats["acc"].item() == sum(int(scores[i].argmax() == t) for i, t in enumerate(targets))


def test_re_rank_negative_pick_and_hinge():
    scores = torch.tensor([[0.5, 2.0, 1.0, -1e4], [3.0, 1.0, -1e4, -1e4], [0.1, 0.2, 0.3, -1e4]])
    targets = torch.tensor([[1], [0], [2]])
    hard = torch.tensor([True, True, False])
    random_pick = torch.tensor([0, 1, 0])
    picked = re_rank_negatives(scores, targets, hard, random_pick)
    # ex0 hard: best non-target is 2 (1.0 > 0.5); ex1 hard: only non-target real region 1; ex2 random: 0.
    assert picked.view(-1).tolist() == [2, 1, 0]

    model = model_for("re-rank-mlp2")
    batch = make_batch(txt_lens=(3, 5, 2), num_bbs=(4, 2, 3))
    batch.update(obj_masks=torch.arange(4)[None] >= batch["num_bbs"][:, None], targets=torch.tensor([1, 0, 2]),
                 re_rank_hard=hard, re_rank_random=random_pick)
    with torch.no_grad():
        s = re_scores_by_hand(model, model.encode(batch), batch["txt_lens"], batch["num_bbs"])
        result = model(batch, training_function(model.head))
    expected = 0.0
    for i, t in enumerate((1, 0, 2)):
        if hard[i]:
            cands = [j for j in range(int(batch["num_bbs"][i])) if j != t]
            neg = max(cands, key=lambda j: s[i, j].item())
        else:
            neg = int(random_pick[i])
        expected += max(0.0, 0.2 + torch.sigmoid(s[i, neg]).item() - torch.sigmoid(s[i, t]).item())
    assert result.losses["loss"].item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="RE loss"):
        re_train(model, batch, loss="hinge")


# ---------------------------------------------------------------- VCR

def test_vcr_loss_acc_per_question_and_eval_column():
    model = model_for("vcr")
    batch = make_batch(txt_lens=(5, 6, 4, 5, 3, 6, 6, 4), num_bbs=(2, 2, 2, 2, 3, 3, 3, 3))
    batch["txt_type_ids"] = (batch["input_ids"] > 0).long() * 2  # answer tokens type 2
    batch["targets"] = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0])
    with torch.no_grad():
        p = pool(model, model.encode(batch))
        head = model.vcr_output
        logits = lin(layer_norm(torch.relu(lin(p, head[0])), head[2]), head[3])  # [8, 2]
        result = model(batch, training_function(model.head))
        col1 = model(batch, prediction_function(model.head))
    torch.testing.assert_close(col1, logits[:, 1], atol=1e-5, rtol=0)
    targets = batch["targets"].tolist()
    expected = sum(torch.logsumexp(logits[r], 0) - logits[r, targets[r]] for r in range(8))
    torch.testing.assert_close(result.losses["loss"], expected, atol=1e-4, rtol=0)
    right = [int(logits[4 * q:4 * q + 4, 1].argmax()) == targets[4 * q:4 * q + 4].index(1) for q in range(2)]
    assert result.stats["acc"].item() == sum(right)
    assert result.counts["acc"].item() == 2


# ---------------------------------------------------------------- every parameter in the graph

def training_batch(name: str) -> Dict[str, Tensor]:
    if name in ("vqa", "ve"):
        batch = make_batch(txt_lens=(5, 3), num_bbs=(2, 4))
        batch["targets"] = torch.rand(2, HEADS[name].num_answers)
    elif name == "retrieval":
        batch = make_batch(txt_lens=(5, 3, 4, 2), num_bbs=(2, 4, 3, 1))
        batch["sample_size"] = 2
    elif name == "nlvr2-triplet":
        batch = make_batch(txt_lens=(5, 3), num_bbs=(4, 2))
        batch.update(targets=torch.tensor([0, 1]), img_type_ids=torch.tensor([[1, 1, 2, 2], [1, 2, 0, 0]]))
    elif name.startswith("nlvr2"):
        batch = make_batch(txt_lens=(5, 5, 3, 3), num_bbs=(2, 4, 3, 1))
        batch["targets"] = torch.tensor([0, 1])
    elif HEADS[name].task == "re":
        batch = make_batch(txt_lens=(3, 5), num_bbs=(4, 2))
        batch.update(obj_masks=torch.arange(4)[None] >= batch["num_bbs"][:, None], targets=torch.tensor([1, 0]),
                     re_rank_hard=torch.tensor([True, False]), re_rank_random=torch.tensor([0, 1]))
    else:
        batch = make_batch(txt_lens=(5, 6, 4, 5), num_bbs=(2, 2, 2, 2))
        batch.update(targets=torch.tensor([0, 1, 0, 0]), txt_type_ids=(batch["input_ids"] > 0).long() * 3)
    return batch


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_parameter_gets_a_gradient_and_unreached_ones_exactly_zero(name):
    model = UniterForFinetuning(TINY, HEADS[name]).train()
    result = model(training_batch(name), training_function(model.head))
    result.losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    unreached = ["uniter.img_embeddings.mask_embedding.weight"]
    if name == "retrieval":
        unreached += ["itm_output.weight", "itm_output.bias"]
    if HEADS[name].task == "re" or name == "nlvr2-paired-attn":
        unreached += ["uniter.pooler.dense.weight", "uniter.pooler.dense.bias"]
    params = dict(model.named_parameters())
    for key in unreached:
        assert torch.equal(params[key].grad, torch.zeros_like(params[key])), key
    assert torch.isfinite(result.losses["loss"])


def test_low_precision_weights_take_fp32_features():
    model = UniterForFinetuning(TINY, HEADS["vqa"]).to(torch.bfloat16)
    batch = training_batch("vqa")
    result = model(batch, training_function(model.head))
    assert result.losses["loss"].dtype == torch.float32 and torch.isfinite(result.losses["loss"])


def test_encode_refuses_packed_or_incomplete_batches():
    model = model_for("vqa")
    batch = make_batch()
    with pytest.raises(ValueError, match="gather_index"):
        model.encode({k: v for k, v in batch.items() if k != "gather_index"})
    with pytest.raises(ValueError, match="pack"):
        model.encode(dict(batch, pack_index=torch.zeros(1, 3, dtype=torch.long)))
