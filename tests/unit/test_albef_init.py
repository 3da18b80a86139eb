"""Initialising ALBEF's encoders from local checkpoints (tiny, made here; nothing downloads):
Hugging Face and timm ViTs reproduce their outputs, position grids are resized bicubically,
bad directories and files are refused with a ValueError, and a BERT splits into text and
fusion layers with the cross-attention left as initialised."""
from __future__ import annotations

import pathlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel, ViTForImageClassification

from trainer.models import albef
from trainer.models.albef_init import load_bert_into_text_encoder, load_vit_directory

CFG = albef.AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1,
                        fusion_layers=1, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, image_size=32, patch_size=16, vision_width=32,
                        vision_layers=2, vision_heads=2, vision_mlp=64, embed_dim=16, queue_size=8)


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (LayerNorms and biases too), so a tensor that fails to load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def vit(seed: int, **sizes) -> torch.nn.Module:
    return randomised(albef.vision_transformer(replace(CFG, **sizes)), seed)


def image_tokens(model: torch.nn.Module, image_size: int = 32) -> torch.Tensor:
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state  # [2, 1+P, W]


def hf_dir(model: torch.nn.Module, d: Path) -> Path:
    model.save_pretrained(d)
    return d


def file_keys(d: Path) -> dict:
    """The checkpoint as stored (file names, whatever the installed transformers calls its modules)."""
    return load_file(str(d / "model.safetensors"))


def timm_state_dict(hf: dict) -> dict:
    """Hugging Face ViT file keys -> timm's, q/k/v fused into qkv (written here independently
    of the loader's tables)."""
    blocks = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
              "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    out = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"],
           "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    for i in range(CFG.vision_layers):
        src = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)  # [3W, W] / [3W]
            for ours, theirs in blocks.items():
                out[f"blocks.{i}.{theirs}.{kind}"] = hf[f"{src}{ours}.{kind}"]
    return out


def timm_dir(sd: dict, d: Path, name: str = "model.safetensors") -> Path:
    d.mkdir()
    if name.endswith(".safetensors"):
        save_file(sd, str(d / name))
    else:
        torch.save({"model": sd}, d / name)  # DeiT's .pth wraps the state dict
    return d


# ---------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_vit_reproduces_the_outputs(tmp_path, fmt):
    ref = vit(seed=1)
    d = hf_dir(ref, tmp_path / "vit")
    if fmt == "bin":
        # transformers >= 5 writes safetensors even with safe_serialization=False: convert by hand.
        torch.save(file_keys(d), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    model = vit(seed=2)
    assert not torch.equal(image_tokens(model), image_tokens(ref))
    assert load_vit_directory(model, d) == []
    assert torch.equal(image_tokens(model), image_tokens(ref))


def test_hf_vit_classification_checkpoint_with_vit_prefix(tmp_path):
    ref = vit(seed=1)
    clf = ViTForImageClassification(replace(ref.config, num_labels=3))
    clf.vit.load_state_dict(ref.state_dict())
    d = hf_dir(clf, tmp_path / "clf")
    assert all(k.startswith(("vit.", "classifier.")) for k in file_keys(d))
    model = vit(seed=2)
    assert sorted(load_vit_directory(model, d)) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(image_tokens(model), image_tokens(ref))


@pytest.mark.parametrize("name", ["model.safetensors", "deit_base.pth"])
def test_timm_vit_reproduces_the_outputs(tmp_path, name):
    ref = vit(seed=1)
    d = timm_dir(timm_state_dict(file_keys(hf_dir(ref, tmp_path / "hf"))), tmp_path / "timm", name)
    model = vit(seed=2)
    assert sorted(load_vit_directory(model, d)) == ["head.bias", "head.weight"]
    assert torch.equal(image_tokens(model), image_tokens(ref))


def module_with_names(shapes: dict) -> torch.nn.Module:
    """A module whose state dict has exactly these names and shapes."""
    root = torch.nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def test_encoder_named_as_the_files_loads_too(tmp_path):
    """transformers < 5 names ViTModel's modules as its files (`encoder.layer.{i}.attention.attention.query`);
    >= 5 renames them (`layers.{i}.attention.q_proj`). Both load."""
    ref = vit(seed=1)
    sd = file_keys(hf_dir(ref, tmp_path / "hf"))
    assert "encoder.layer.0.attention.attention.query.weight" in sd
    old_style = module_with_names({k: v.shape for k, v in sd.items()})
    load_vit_directory(old_style, timm_dir(timm_state_dict(sd), tmp_path / "timm"))
    assert all(torch.equal(old_style.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_position_grid_is_interpolated_bicubically(tmp_path, fmt):
    ref = vit(seed=1)  # 32 px: 2x2 patches
    d = hf_dir(ref, tmp_path / "hf")
    if fmt == "timm":
        d = timm_dir(timm_state_dict(file_keys(d)), tmp_path / "timm")
    model = vit(seed=2, image_size=48)  # 3x3 patches
    load_vit_directory(model, d)
    old = ref.embeddings.position_embeddings.detach()  # [1, 5, W]
    grid = old[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)  # [1, W, 2, 2]
    grid = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, 32)
    new = model.embeddings.position_embeddings.detach()  # [1, 10, W]
    assert torch.equal(new[:, :1], old[:, :1])  # cls position kept
    assert torch.equal(new[:, 1:], grid)
    assert torch.equal(model.embeddings.cls_token, ref.embeddings.cls_token)
    assert image_tokens(model, 48).shape == (2, 10, 32)


def test_missing_directory_and_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        load_vit_directory(vit(seed=0), tmp_path / "nowhere")
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights file.*model.safetensors"):
        load_vit_directory(vit(seed=0), d)


@pytest.mark.parametrize("sizes, message", [
    ({"vision_width": 48}, "width 48 vs model.vision_width 32"),
    ({"vision_layers": 1}, "1 layers vs model.vision_layers 2"),
    ({"patch_size": 8}, "patch"),
    ({"vision_heads": 4}, "num_attention_heads 4 vs model.vision_heads 2"),
])
def test_size_mismatch_is_refused(tmp_path, sizes, message):
    d = hf_dir(vit(seed=1, **sizes), tmp_path / "vit")
    with pytest.raises(ValueError, match=message) as err:
        load_vit_directory(vit(seed=2), d)
    assert str(d) in str(err.value)


def test_missing_or_unknown_tensors_are_refused(tmp_path):
    sd = timm_state_dict(file_keys(hf_dir(vit(seed=1), tmp_path / "hf")))
    without_norm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match=r"missing 2 \[layernorm.weight, layernorm.bias\]"):
        load_vit_directory(vit(seed=2), timm_dir(without_norm, tmp_path / "a"))
    layer_scale = {**sd, "blocks.0.ls1.gamma": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected 1 \[blocks.0.ls1.gamma\]"):
        load_vit_directory(vit(seed=2), timm_dir(layer_scale, tmp_path / "b"))
    with pytest.raises(ValueError, match=r"neither a Hugging Face ViT .* nor a timm ViT .*keys: 1 \[foo.weight\]"):
        load_vit_directory(vit(seed=2), timm_dir({"foo.weight": torch.ones(2)}, tmp_path / "c"))


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it (without weights_only) would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickles_with_objects_are_refused_not_unpickled(tmp_path):
    marker = tmp_path / "code_ran"
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"cls_token": RunsCodeWhenUnpickled(marker)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load: .*Unsupported global"):
        load_vit_directory(vit(seed=0), d)
    assert not marker.exists()
    torch.save({"cls_token": torch.ones(1), "epoch": 3}, d / "pytorch_model.bin")  # loads, but is no state dict
    with pytest.raises(ValueError, match=r"non-tensor entries 1 \[epoch \(int\)\]"):
        load_vit_directory(vit(seed=0), d)
    (d / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="refused to load: .*Unsupported operand"):
        load_vit_directory(vit(seed=0), d)


# ---------------------------------------------------------------------------- BERT


def bert_dir(d: Path, head: bool = True, **sizes) -> tuple[torch.nn.Module, Path]:
    """A tiny random BERT saved with save_pretrained; returns the model and its directory."""
    cfg = BertConfig(**{"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0, **sizes})
    model = randomised((BertForMaskedLM if head else BertModel)(cfg), seed=3)
    model.save_pretrained(d)
    return model, d


def text_encoder(seed: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return albef.TextEncoder(CFG).eval()


def cross_attention(enc: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in enc.state_dict().items() if ".crossattention." in k}


def test_bert_splits_into_text_and_fusion_layers(tmp_path):
    bert, d = bert_dir(tmp_path / "bert")
    enc = text_encoder()
    cross = cross_attention(enc)
    assert load_bert_into_text_encoder(enc, d) == list(cross)
    ids = torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        theirs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = enc.text(ids, mask)  # [2, 7, 32]
    assert torch.allclose(ours, theirs[CFG.text_layers], rtol=0, atol=1e-5)
    bert_layer = bert.bert.encoder.layer[CFG.text_layers].state_dict()
    fusion = enc.fusion[0].state_dict()
    assert all(torch.equal(fusion[k], v) for k, v in bert_layer.items())
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in cross.items())  # no BERT source
    h = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(enc.cls(h, enc.embeddings.word_embeddings.weight), bert.cls(h), rtol=0, atol=1e-5)


def test_bert_without_mlm_head_leaves_the_head_as_initialised(tmp_path):
    _, d = bert_dir(tmp_path / "bert", head=False)
    enc = text_encoder()
    head = {k: v.clone() for k, v in enc.cls.state_dict().items()}
    left = load_bert_into_text_encoder(enc, d)
    assert left == list(cross_attention(enc)) + [f"cls.{k}" for k in head]
    assert all(torch.equal(v, enc.cls.state_dict()[k]) for k, v in head.items())


@pytest.mark.parametrize("sizes, message", [
    ({"vocab_size": 60}, "vocab_size=60 but the text encoder has 50; set model.vocab_size=60"),
    ({"hidden_size": 48}, "hidden_size=48 but the text encoder has 32"),
    ({"num_attention_heads": 4}, "num_attention_heads=4"),
    ({"num_hidden_layers": 1}, "num_hidden_layers=1 but model.text_layers \\+ model.fusion_layers = 1 \\+ 1 = 2"),
])
def test_bert_size_mismatch_is_refused(tmp_path, sizes, message):
    _, d = bert_dir(tmp_path / "bert", **sizes)
    with pytest.raises(ValueError, match=message):
        load_bert_into_text_encoder(text_encoder(), d)


def test_bert_missing_directory_or_layer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        load_bert_into_text_encoder(text_encoder(), tmp_path / "nowhere")
    _, d = bert_dir(tmp_path / "bert")
    sd = {k: v for k, v in file_keys(d).items() if "layer.1.intermediate" not in k}
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no BERT weights for 2 \[fusion.0.intermediate.dense.weight"):
        load_bert_into_text_encoder(text_encoder(), d)
