"""UNITER model: checkpoint compatibility, BERT equivalence and the formulas of
docs/models.md, "UNITER model" (CPU, tiny)."""
from __future__ import annotations

import ast
import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kernels.masked_gather import masked_gather
from trainer.models import bert as bert_module
from trainer.models.bert import SelfAttention, extended_attention_mask
from trainer.models.config import ModelConfig
from trainer.models.convert import (
    TIED_DUPLICATES,
    export_uniter_state_dict,
    import_uniter_state_dict,
    load_bert_directory,
    load_uniter_checkpoint,
    save_uniter_checkpoint,
)
from trainer.models.pretrain import UniterForPretraining, build_uniter
from trainer.recipes import recipe_class

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "uniter_base_state_dict.txt"
TINY = ModelConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, img_dim=16, img_label_dim=9,
)
WORD_EMB = "uniter.embeddings.word_embeddings.weight"
IMG_LINEAR = "uniter.img_embeddings.img_linear.weight"


# ---------------------------------------------------------------- helpers

def reference_shapes() -> Tuple[Dict[str, Tuple[int, ...]], int]:
    """First block of the fixture -> (key -> shape, unique param count from its header)."""
    lines = FIXTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## UniterForPretraining"))
    n_params = int(re.search(r"(\d+) unique params", lines[start]).group(1))
    shapes: Dict[str, Tuple[int, ...]] = {}
    for line in lines[start + 1:]:
        if line.startswith("##"):
            break
        if line.strip():
            key, rest = line.split(" ", 1)
            shapes[key] = tuple(ast.literal_eval(rest.rsplit(" ", 1)[0]))
    return shapes, n_params


def tiny_reference_shapes(cfg: ModelConfig = TINY) -> Dict[str, Tuple[int, ...]]:
    """Reference shapes rescaled to `cfg`, keeping only its layers."""
    dims = {768: cfg.hidden_size, 3072: cfg.intermediate_size, 28996: cfg.vocab_size,
            2048: cfg.img_dim, 1601: cfg.img_label_dim}
    out = {}
    for key, shape in reference_shapes()[0].items():
        layer = re.match(r"uniter\.encoder\.layer\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
            continue
        out[key] = tuple(dims.get(d, d) for d in shape)
    return out


def uniter_format_state_dict(cfg: ModelConfig = TINY, seed: int = 0) -> Dict[str, Tensor]:
    """Random state dict in UNITER's own format (tied duplicates equal to their sources)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) for k, shape in tiny_reference_shapes(cfg).items()}
    for dup, src in TIED_DUPLICATES.items():
        sd[dup] = sd[src].clone()
    return sd


def layernorm_param_keys(model: nn.Module) -> List[str]:
    return [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
            for p in ("weight", "bias")]


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Give every parameter (biases and LayerNorms too) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    ln_weights = {k for k in layernorm_param_keys(model) if k.endswith("weight")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name in ln_weights else 0.0))
    return model


def text_batch(cfg: ModelConfig = TINY, lens=(7, 4, 2), seed: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lt = max(lens)
    ids = torch.randint(1, cfg.vocab_size, (len(lens), lt), generator=g)
    mask = (torch.arange(lt)[None] < torch.tensor(lens)[:, None]).long()  # [B, Lt]
    return ids * mask, torch.arange(lt)[None], mask


def packed_batch(cfg: ModelConfig = TINY, txt_lens=(5, 3), num_bbs=(2, 4), seed: int = 2) -> Dict[str, Tensor]:
    """A collated UNITER batch built the way UNITER's collate does (get_gather_index)."""
    g = torch.Generator().manual_seed(seed)
    b, lt, ni = len(txt_lens), max(txt_lens), max(num_bbs)
    ids, pos, _ = text_batch(cfg, txt_lens, seed)
    length = max(t + n for t, n in zip(txt_lens, num_bbs))
    gather = torch.arange(length).repeat(b, 1)  # [B, L]
    attn = torch.zeros(b, length, dtype=torch.long)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        gather[i, t:t + n] = torch.arange(lt, lt + n)
        attn[i, :t + n] = 1
    return {
        "input_ids": ids, "position_ids": pos,
        "img_feat": torch.randn(b, ni, cfg.img_dim, generator=g),
        "img_pos_feat": torch.rand(b, ni, 7, generator=g),
        "attn_masks": attn, "gather_index": gather,
        "txt_lens": torch.tensor(txt_lens), "num_bbs": torch.tensor(num_bbs),
    }


def hf_bert(cfg: ModelConfig):
    transformers = pytest.importorskip("transformers")
    bert_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, hidden_act="gelu", layer_norm_eps=1e-12,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=2,
        attn_implementation="eager",
    )
    return transformers.BertModel(bert_cfg, add_pooling_layer=True).eval()


def backbone_as_bert(model: UniterForPretraining) -> Dict[str, Tensor]:
    prefixes = ("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.")
    return {k.removeprefix("uniter."): v for k, v in model.state_dict().items() if k.startswith(prefixes)}


# ---------------------------------------------------------------- 1. UNITER checkpoint compatibility

def test_uniter_state_dict_import_export_round_trip():
    ref = uniter_format_state_dict()
    assert len(ref) == 230 - 10 * 16  # 2 of 12 layers kept
    ours = import_uniter_state_dict(ref)
    assert set(ref) - set(ours) == set(TIED_DUPLICATES)
    model = UniterForPretraining(TINY)
    result = model.load_state_dict(ours, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    exported = export_uniter_state_dict(model.state_dict())
    assert set(exported) == set(ref)
    assert list(exported) == list(ref)  # UNITER's key order is kept too
    for key, value in ref.items():
        assert torch.equal(exported[key], value), key


def test_uniter_import_renames_legacy_gamma_beta():
    ref = uniter_format_state_dict()
    ln_keys = set(layernorm_param_keys(UniterForPretraining(TINY)))
    assert len(ln_keys) == 2 * (1 + 3 + 2 * TINY.num_hidden_layers + 3)
    legacy = {(k[: -len("weight")] + "gamma" if k.endswith("weight") else k[: -len("bias")] + "beta")
              if k in ln_keys else k: v for k, v in ref.items()}
    assert sum(k.endswith((".gamma", ".beta")) for k in legacy) == len(ln_keys)
    imported = import_uniter_state_dict(legacy)
    expected = import_uniter_state_dict(ref)
    assert set(imported) == set(expected)
    assert all(torch.equal(imported[k], expected[k]) for k in expected)
    UniterForPretraining(TINY).load_state_dict(imported, strict=True)


@pytest.mark.parametrize("dup", sorted(TIED_DUPLICATES))
def test_uniter_import_rejects_untied_duplicate(dup):
    ref = uniter_format_state_dict()
    ref[dup] = ref[dup] + 1e-3
    with pytest.raises(ValueError, match=re.escape(dup)):
        import_uniter_state_dict(ref)


def test_uniter_checkpoint_file_round_trip_and_mismatch(tmp_path):
    ref = uniter_format_state_dict()
    path = tmp_path / "model_step_100.pt"
    torch.save(ref, path)
    model = UniterForPretraining(TINY)
    load_uniter_checkpoint(model, path)
    out = tmp_path / "out" / "model_step_200.pt"
    save_uniter_checkpoint(model, out)
    saved = torch.load(out, weights_only=True)
    assert list(saved) == list(ref) and all(torch.equal(saved[k], ref[k]) for k in ref)

    bad = dict(ref)
    bad.pop("itm_output.bias")
    bad["vqa_output.0.weight"] = torch.zeros(3)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"missing 1 \[itm_output.bias\].*unexpected 1 \[vqa_output.0.weight\]"):
        load_uniter_checkpoint(model, path)
    big = uniter_format_state_dict(replace(TINY, num_hidden_layers=14))
    torch.save(big, path)
    with pytest.raises(ValueError, match=r"unexpected 160 \[.*\.\.\. and 150 more\]"):
        load_uniter_checkpoint(model, path)


# ---------------------------------------------------------------- 2. UNITER-base size

def test_base_model_matches_reference_keys_and_param_count():
    shapes, n_params = reference_shapes()
    assert len(shapes) == 230 and n_params == 112_938_887
    with torch.device("meta"):
        model = UniterForPretraining(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 112_938_887
    sd = model.state_dict()
    assert len(sd) == 228
    expected = {k: s for k, s in shapes.items() if k not in TIED_DUPLICATES}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert list(sd) == list(expected)


# ---------------------------------------------------------------- 3. equivalence with transformers' BERT

def test_text_forward_matches_transformers_bert():
    model = randomize_(UniterForPretraining(TINY)).eval()
    bert = hf_bert(TINY)
    bert.load_state_dict(backbone_as_bert(model), strict=True)
    ids, pos, mask = text_batch()
    with torch.no_grad():
        ours = model.uniter(ids, pos, None, None, mask, None)  # [B, Lt, H]
        theirs = bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs.last_hidden_state[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.uniter.pooled(ours), theirs.pooler_output, atol=1e-5, rtol=0)


def test_load_bert_directory_safetensors(tmp_path, caplog):
    bert = randomize_(hf_bert(TINY), seed=3)
    bert.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = UniterForPretraining(TINY).eval()
    with caplog.at_level(logging.INFO, logger="trainer.models.convert"):
        loaded = load_bert_directory(model, tmp_path)
    assert set(loaded) == {"uniter." + k for k in backbone_as_bert(model)}
    assert "uniter.img_embeddings (11)" in caplog.text and "itm_output (2)" in caplog.text
    ids, pos, mask = text_batch()
    with torch.no_grad():
        ours = model.uniter(ids, pos, None, None, mask, None)
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


def _write_legacy_bert_dir(path: Path, bert, extra_cfg: Dict = None) -> Dict[str, Tensor]:
    """pytorch_model.bin with `bert.` prefix, gamma/beta names and MLM/NSP heads, as old dumps have."""
    path.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in bert.state_dict().items():
        k = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k))
        sd["bert." + k] = v
    h, vocab = TINY.hidden_size, TINY.vocab_size
    heads = {"cls.predictions.bias": torch.randn(vocab), "cls.predictions.transform.dense.weight": torch.randn(h, h),
             "cls.predictions.transform.dense.bias": torch.randn(h),
             "cls.predictions.transform.LayerNorm.gamma": torch.randn(h),
             "cls.predictions.transform.LayerNorm.beta": torch.randn(h),
             "cls.predictions.decoder.weight": torch.randn(vocab, h), "cls.seq_relationship.weight": torch.randn(2, h)}
    sd.update(heads)
    torch.save(sd, path / "pytorch_model.bin")
    cfg = {**bert.config.to_dict(), **(extra_cfg or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return heads


def test_load_bert_directory_legacy_bin_and_config_checks(tmp_path):
    bert = randomize_(hf_bert(TINY), seed=4)
    heads = _write_legacy_bert_dir(tmp_path / "ok", bert)
    model = UniterForPretraining(TINY).eval()
    loaded = load_bert_directory(model, tmp_path / "ok")
    assert len(loaded) == len(backbone_as_bert(model)) + 5
    assert torch.equal(model.cls.predictions.transform.LayerNorm.weight,
                       heads["cls.predictions.transform.LayerNorm.gamma"])
    assert torch.equal(model.uniter.embeddings.LayerNorm.bias, bert.embeddings.LayerNorm.bias)

    _write_legacy_bert_dir(tmp_path / "wide", bert, {"intermediate_size": 128})
    with pytest.raises(ValueError, match="intermediate_size"):
        load_bert_directory(model, tmp_path / "wide")
    _write_legacy_bert_dir(tmp_path / "vocab", bert, {"vocab_size": 60})
    with pytest.raises(ValueError, match="vocab_size"):
        load_bert_directory(model, tmp_path / "vocab")
    with pytest.raises(ValueError, match="no-such-dir"):
        load_bert_directory(model, tmp_path / "no-such-dir")


def test_load_bert_directory_vocab_resize(tmp_path):
    big = replace(TINY, vocab_size=60)
    bert = randomize_(hf_bert(big), seed=5)
    bert.save_pretrained(tmp_path)
    model = UniterForPretraining(TINY)
    with pytest.raises(ValueError, match="vocab_size"):
        load_bert_directory(model, tmp_path)
    load_bert_directory(model, tmp_path, allow_vocab_resize=True)
    assert torch.equal(model.uniter.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight[:50])


def test_build_uniter_init_order_and_missing_paths(tmp_path):
    bert = randomize_(hf_bert(TINY), seed=6)
    bert.save_pretrained(tmp_path / "bert")
    ref = uniter_format_state_dict(seed=7)
    torch.save(ref, tmp_path / "model_step_1.pt")
    model = build_uniter(replace(TINY, init_from_bert=str(tmp_path / "bert")))
    assert torch.equal(model.uniter.encoder.layer[0].output.dense.weight, bert.encoder.layer[0].output.dense.weight)
    model = build_uniter(replace(TINY, init_from_bert=str(tmp_path / "bert"),
                                init_from_uniter=str(tmp_path / "model_step_1.pt")))
    assert torch.equal(model.state_dict()[WORD_EMB], ref[WORD_EMB])  # UNITER applied last
    for field, missing in (("init_from_bert", tmp_path / "nope"), ("init_from_uniter", tmp_path / "nope.pt")):
        with pytest.raises(ValueError, match=re.escape(str(missing))):
            build_uniter(replace(TINY, **{field: str(missing)}))
    # model.arch picks the builder through the recipe registry (UniterRecipe.build_model -> build_uniter);
    # an arch no recipe knows is refused there
    recipe = recipe_class("uniter")
    assert recipe.model_config is ModelConfig and recipe.build_model is not recipe_class("albef").build_model
    with pytest.raises(ValueError, match="arch"):
        recipe_class("no-such-arch")


# ---------------------------------------------------------------- 4. docs/models.md formulas

def _ln(x: Tensor, mod: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, eps=1e-12)


def expected_image_embeddings(model: UniterForPretraining, f: Tensor, p: Tensor, m: Tensor) -> Tensor:
    e = model.uniter.img_embeddings
    f = f + m[..., None].float() * e.mask_embedding.weight[1]
    typ = model.uniter.embeddings.token_type_embeddings.weight[1]
    return _ln(_ln(f @ e.img_linear.weight.T + e.img_linear.bias, e.img_layer_norm)
               + _ln(p @ e.pos_linear.weight.T + e.pos_linear.bias, e.pos_layer_norm) + typ, e.LayerNorm)


def expected_text_embeddings(model: UniterForPretraining, ids: Tensor) -> Tensor:
    e = model.uniter.embeddings
    x = e.word_embeddings.weight[ids] + e.position_embeddings.weight[: ids.shape[1]] + e.token_type_embeddings.weight[0]
    return _ln(x, e.LayerNorm)


def test_embeddings_and_packing_follow_design_formulas():
    model = randomize_(UniterForPretraining(TINY)).eval()
    batch = packed_batch()
    img_masks = torch.tensor([[True, False, False, False], [False, True, False, True]])
    captured = {}
    model.uniter.encoder.register_forward_pre_hook(lambda mod, args: captured.update(emb=args[0]))
    with torch.no_grad():
        model.encode(batch, img_masks=img_masks)
        txt = expected_text_embeddings(model, batch["input_ids"])  # [B, Lt, H]
        img = expected_image_embeddings(model, batch["img_feat"], batch["img_pos_feat"], img_masks)  # [B, Ni, H]
    emb = captured["emb"]  # [B, L, H]
    for i, (t, n) in enumerate(zip(batch["txt_lens"].tolist(), batch["num_bbs"].tolist())):
        torch.testing.assert_close(emb[i, :t], txt[i, :t], atol=1e-6, rtol=0)
        torch.testing.assert_close(emb[i, t:t + n], img[i, :n], atol=1e-6, rtol=0)


def test_mask_embedding_row_zero_is_never_used():
    model = randomize_(UniterForPretraining(TINY)).eval()
    e = model.uniter.img_embeddings
    batch = packed_batch()
    f, p = batch["img_feat"], batch["img_pos_feat"]
    m = torch.tensor([[True, False, True, False], [False, False, False, True]])
    typ = model.uniter.embeddings.token_type_embeddings.weight[1]
    with torch.no_grad():
        out = e(f, p, typ, m)
        e.mask_embedding.weight[0].add_(3.0)
        assert torch.equal(e(f, p, typ, m), out)
        torch.testing.assert_close(e(f, p, typ, None)[~m], out[~m], atol=1e-6, rtol=0)
        assert not torch.allclose(e(f, p, typ, None)[m], out[m])


def test_valid_outputs_independent_of_padding_and_other_examples():
    model = randomize_(UniterForPretraining(TINY)).eval()
    batch = packed_batch()
    with torch.no_grad():
        base = model.encode(batch)  # [B, L, H]
        changed = dict(batch)
        changed["input_ids"] = batch["input_ids"].clone()
        changed["input_ids"][1, 3:] = 7  # text padding of example 1
        changed["img_feat"] = batch["img_feat"].clone()
        changed["img_feat"][0, 2:] = 100.0  # region padding of example 0
        changed["img_feat"][1] = torch.randn_like(batch["img_feat"][1])  # other example
        changed["gather_index"] = batch["gather_index"].clone()
        changed["gather_index"][0, 7:] = 0  # pad slots of example 0 point elsewhere
        out = model.encode(changed)
        t0, n0 = 5, 2
        torch.testing.assert_close(out[0, : t0 + n0], base[0, : t0 + n0], atol=1e-6, rtol=0)
        alone = model.encode({
            "input_ids": batch["input_ids"][:1, :t0], "position_ids": batch["position_ids"][:, :t0],
            "img_feat": batch["img_feat"][:1, :n0], "img_pos_feat": batch["img_pos_feat"][:1, :n0],
            "attn_masks": torch.ones(1, t0 + n0, dtype=torch.long),
            "gather_index": torch.arange(t0 + n0)[None],
        })
    torch.testing.assert_close(alone[0], base[0, : t0 + n0], atol=1e-6, rtol=0)


def test_heads_use_tied_weights():
    model = randomize_(UniterForPretraining(TINY))
    word, img_linear = model.uniter.embeddings.word_embeddings.weight, model.uniter.img_embeddings.img_linear.weight
    assert [n for n, p in model.named_parameters() if p.shape == word.shape] == [WORD_EMB]
    assert [n for n, p in model.named_parameters() if p.shape == img_linear.shape] == [IMG_LINEAR]
    h = torch.randn(5, TINY.hidden_size)
    logits = model.mlm_logits(h)  # [N, V]
    torch.testing.assert_close(
        logits, F.linear(model.cls.predictions.transform(h), word, model.cls.predictions.bias))
    feats = model.mrfr_features(h)  # [N, img_dim]
    assert feats.shape == (5, TINY.img_dim)
    torch.testing.assert_close(feats, model.feat_regress.net(h) @ img_linear + model.feat_regress.bias)
    (logits.sum() + feats.sum()).backward()
    assert word.grad is not None and word.grad.abs().sum() > 0
    assert img_linear.grad is not None and img_linear.grad.abs().sum() > 0
    assert model.mrc_logits(h).shape == (5, TINY.img_label_dim)
    assert model.itm_logits(torch.randn(3, 4, TINY.hidden_size)).shape == (3, 2)


def test_head_biases_init_zero_and_init_ranges():
    model = UniterForPretraining(TINY)
    assert torch.count_nonzero(model.cls.predictions.bias) == 0
    assert torch.count_nonzero(model.feat_regress.bias) == 0
    assert torch.count_nonzero(model.region_classifier.net[3].bias) == 0
    assert torch.equal(model.region_classifier.net[2].weight, torch.ones(TINY.hidden_size))
    big = UniterForPretraining(replace(TINY, hidden_size=256, num_attention_heads=4, num_hidden_layers=1))
    assert abs(big.uniter.encoder.layer[0].attention.self.query.weight.std().item() - 0.02) < 2e-3


def test_attention_mask_is_additive_minus_10000():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ext = extended_attention_mask(m, torch.float32)
    assert ext.shape == (2, 1, 1, 3)
    assert torch.equal(ext[:, 0, 0], torch.tensor([[0.0, 0.0, -10000.0], [0.0, -10000.0, -10000.0]]))
    assert extended_attention_mask(m, torch.bfloat16).dtype == torch.bfloat16


def explicit_attention(attn: SelfAttention, hidden: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the softmax in fp32, as BERT writes it."""
    b, l, h = hidden.shape
    nh, d = attn.num_heads, attn.head_dim
    q, k, v = (lin(hidden).view(b, l, nh, d).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask.to(q.dtype)  # [B, nh, L, L]
    probs = scores.float().softmax(-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, l, h)


@pytest.mark.parametrize("heads,hidden,length", [(2, 32, 9), (12, 768, 37)])
def test_sdpa_attention_equals_explicit_math_fp32(heads, hidden, length):
    """SDPA is used in SelfAttention only because this holds within 1e-6 in fp32."""
    cfg = replace(TINY, hidden_size=hidden, num_attention_heads=heads)
    attn = SelfAttention(cfg).eval()
    torch.manual_seed(0)
    x = torch.randn(3, length, hidden)
    m = (torch.rand(3, length) > 0.3).long()
    m[:, 0] = 1
    mask = extended_attention_mask(m, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), explicit_attention(attn, x, mask), atol=1e-6, rtol=0)


def test_low_precision_forward_is_finite_and_close():
    model = randomize_(UniterForPretraining(TINY), std=0.1).eval()
    batch = packed_batch()
    with torch.no_grad():
        ref = model.encode(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.encode(batch)
        half = model.to(torch.bfloat16).encode(
            {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    valid = batch["attn_masks"].bool()
    for out in (auto, half):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[valid].float(), ref[valid], atol=0.15, rtol=0)


def test_activation_checkpointing_matches_plain(monkeypatch):
    calls = []
    real = bert_module.checkpoint
    monkeypatch.setattr(bert_module, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = UniterForPretraining(replace(TINY, activation_checkpointing=flag)).train()
        torch.manual_seed(1)
        loss = model.encode(packed_batch()).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [{"use_reentrant": False}] * TINY.num_hidden_layers
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_forward_rejects_inconsistent_inputs():
    model = UniterForPretraining(TINY)
    batch = packed_batch()
    with pytest.raises(ValueError, match="gather_index"):
        model.encode({**batch, "gather_index": batch["gather_index"][:, :-1]})
    with pytest.raises(ValueError, match="missing"):
        model.encode({k: v for k, v in batch.items() if k != "attn_masks"})


# ---------------------------------------------------------------- 5. masked gather reference

def test_masked_gather_matches_boolean_indexing():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.rand(3, 5) > 0.5
    index = mask.flatten().nonzero().squeeze(1)  # the host-side collate computes these
    out = masked_gather(hidden, index)
    assert torch.equal(out, hidden[mask])
    grad_out = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, hidden, grad_out)
    (ref,) = torch.autograd.grad(hidden[mask], hidden, grad_out)
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError):
        masked_gather(hidden[0], index)


# ---------------------------------------------------------------- config

def test_model_config_validation():
    assert ModelConfig().hidden_size == 768
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig(intermediate_size=0)
    with pytest.raises(ValueError, match="img_dim"):
        ModelConfig(img_dim=-1)


@pytest.mark.parametrize("name,sizes", [
    ("uniter-tiny", (128, 4, 4, 512)), ("uniter-base", (768, 12, 12, 3072)), ("uniter-large", (1024, 24, 16, 4096)),
])
def test_model_yaml_files(name, sizes):
    cfg = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())["model"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == sizes
    as_base = replace(cfg, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    assert as_base == ModelConfig()  # everything else is the base value
