"""Initialise ALBEF's encoders from local checkpoint directories (docs/models.md, "ALBEF model").

- The image encoder (a `transformers.ViTModel`) from a Hugging Face ViT directory (config.json
  + weights; `vit.`-prefixed classification checkpoints too) or a timm one (fused `qkv`),
  with the patch position grid resized bicubically when the image size differs (as ALBEF's
  `interpolate_pos_embed`). Strict: every encoder tensor must come from the file.
- The text encoder from a Hugging Face BERT directory: BERT layers 0..T-1 become the text
  layers, T..T+F-1 the fusion layers' self-attention and FFN; the cross-attention has no
  BERT source and stays as initialised (as ALBEF does from bert-base-uncased).

Only local paths are read, nothing is downloaded. Weights are read with safetensors or
`torch.load(weights_only=True)`: a file can hold tensors, never code that runs on load.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.weights import (
    PathLike, existing_path, listed, plain_state_dict, read_bert_weights, read_config_json, reading_weights,
    rename_legacy_layernorm,
)

logger = logging.getLogger(__name__)

CLS = "embeddings.cls_token"
POS = "embeddings.position_embeddings"
PATCH = "embeddings.patch_embeddings.projection.weight"
# Checkpoint parts with no counterpart in the encoder: classification heads and poolers.
_HF_IGNORED = ("classifier.", "pooler.")
_TIMM_IGNORED = ("head.", "fc_norm.", "pre_logits.")
# timm name -> Hugging Face ViT name (the on-disk names, which every transformers version reads).
_TIMM_TOP = {
    "cls_token": CLS,
    "pos_embed": POS,
    "patch_embed.proj.weight": PATCH,
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_TIMM_BLOCK = {
    "norm1.": "layernorm_before.",
    "attn.proj.": "attention.output.dense.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Per-layer names: files (and transformers < 5 ViTModel) `encoder.layer.{i}.<left>`;
# transformers >= 5 ViTModel in memory `layers.{i}.<right>`.
_HF_LAYER_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "layernorm_before.": "layernorm_before.",
    "layernorm_after.": "layernorm_after.",
}
_FILE_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_MODULE_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_BERT_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.((?:attention|intermediate|output)\..+)$")


# ---------------------------------------------------------------------------- reading files


def _read_weights(d: Path) -> Dict[str, Tensor]:
    """model.safetensors, pytorch_model.bin (Hugging Face / timm on the Hub) or one *.pth (timm, DeiT)."""
    if (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file():
        with reading_weights(d):
            return plain_state_dict(read_bert_weights(d), d)
    pth = sorted(d.glob("*.pth"))
    if len(pth) != 1:
        found = f"several *.pth files {[p.name for p in pth]}" if pth else "no weights file"
        raise ValueError(f"{d}: {found}; expected model.safetensors, pytorch_model.bin or exactly one *.pth")
    with reading_weights(pth[0]):
        return plain_state_dict(torch.load(pth[0], map_location="cpu", weights_only=True), pth[0])


# ---------------------------------------------------------------------------- ViT: file names


def _from_hf(sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Hugging Face ViT file -> file names without `vit.`; also the ignored keys."""
    out, ignored = {}, []
    for key, value in sd.items():
        name = key.removeprefix("vit.")
        if name.startswith(_HF_IGNORED):
            ignored.append(key)
            continue
        layer = _MODULE_LAYER_KEY.match(name)  # saved from transformers >= 5 in its own names
        out[_file_layer_name(layer) if layer else name] = value
    return out, ignored


def _from_timm(sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """timm ViT -> Hugging Face file names, splitting the fused qkv; unknown keys pass through
    unchanged so that the strict check names them."""
    out, ignored = {}, []
    for key, value in sd.items():
        block = _TIMM_BLOCK_KEY.match(key)
        if key.startswith(_TIMM_IGNORED):
            ignored.append(key)
        elif key in _TIMM_TOP:
            out[_TIMM_TOP[key]] = value
        elif block and block.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
            out.update(_split_qkv(int(block.group(1)), block.group(2).rsplit(".", 1)[1], value))
        elif block and block.group(2).startswith(tuple(_TIMM_BLOCK)):
            old = next(p for p in _TIMM_BLOCK if block.group(2).startswith(p))
            out[f"encoder.layer.{block.group(1)}.{_TIMM_BLOCK[old]}{block.group(2)[len(old):]}"] = value
        else:
            out[key] = value
    return out, ignored


def _split_qkv(i: int, kind: str, qkv: Tensor) -> Dict[str, Tensor]:
    """timm's qkv [3W, W] (or bias [3W]) stacks q, k, v along dim 0 (its forward reshapes the
    output to [.., 3, heads, head_dim]), so thirds are the separate projections."""
    if qkv.shape[0] % 3:
        raise ValueError(f"blocks.{i}.attn.qkv.{kind} has {qkv.shape[0]} rows, not a multiple of 3")
    q, k, v = qkv.chunk(3, dim=0)  # each [W, W] / [W]
    prefix = f"encoder.layer.{i}.attention.attention"
    return {f"{prefix}.query.{kind}": q, f"{prefix}.key.{kind}": k, f"{prefix}.value.{kind}": v}


def _file_layer_name(m: re.Match) -> str:
    rest = m.group(2)
    for file_part, module_part in _HF_LAYER_RENAMES.items():
        if rest.startswith(module_part):
            return f"encoder.layer.{m.group(1)}.{file_part}{rest[len(module_part):]}"
    return m.string  # no counterpart: the strict check reports it


def _module_layer_name(m: re.Match) -> str:
    rest = m.group(2)
    for file_part, module_part in _HF_LAYER_RENAMES.items():
        if rest.startswith(file_part):
            return f"layers.{m.group(1)}.{module_part}{rest[len(file_part):]}"
    return m.string


def _to_file_names(sd: Mapping[str, Tensor], d: Path) -> Tuple[Dict[str, Tensor], List[str]]:
    """Detect the checkpoint format from its keys."""
    names = {k.removeprefix("vit.") for k in sd}
    if PATCH in names:
        return _from_hf(sd)
    if "patch_embed.proj.weight" in sd:
        return _from_timm(sd)
    raise ValueError(f"{d}: neither a Hugging Face ViT ({PATCH}) nor a timm ViT (patch_embed.proj.weight) "
                     f"checkpoint; its keys: {listed(sorted(sd))}")


def _to_module_names(sd: Mapping[str, Tensor], module_keys: List[str]) -> Dict[str, Tensor]:
    """File names -> the encoder's own: transformers < 5 keeps the file names, >= 5 renames the layers."""
    if any(_FILE_LAYER_KEY.match(k) for k in module_keys):
        return dict(sd)
    out = {}
    for key, value in sd.items():
        layer = _FILE_LAYER_KEY.match(key)
        out[_module_layer_name(layer) if layer else key] = value
    return out


# ---------------------------------------------------------------------------- ViT: sizes


def _depth(keys) -> int:
    """Number of transformer layers that `keys` (file or module names) name."""
    found = set()
    for key in keys:
        layer = _FILE_LAYER_KEY.match(key) or _MODULE_LAYER_KEY.match(key)
        if layer:
            found.add(int(layer.group(1)))
    return max(found, default=-1) + 1


def _check_vit_sizes(sd: Mapping[str, Tensor], ours: Mapping[str, Tensor], config: dict, vit: nn.Module,
                     d: Path) -> None:
    """Width, patch, depth and heads first: clearer than a list of mismatched tensors."""
    problems = []
    if CLS in sd and sd[CLS].shape[-1] != ours[CLS].shape[-1]:
        problems.append(f"width {sd[CLS].shape[-1]} vs model.vision_width {ours[CLS].shape[-1]}")
    if PATCH in sd and sd[PATCH].shape[1:] != ours[PATCH].shape[1:]:
        problems.append(f"patch (channels, h, w) {tuple(sd[PATCH].shape[1:])} vs model {tuple(ours[PATCH].shape[1:])}"
                        " (model.patch_size)")
    if _depth(sd) != _depth(ours):
        problems.append(f"{_depth(sd)} layers vs model.vision_layers {_depth(ours)}")
    heads = getattr(getattr(vit, "config", None), "num_attention_heads", None)
    if heads is not None and config.get("num_attention_heads") not in (None, heads):
        # The weights' shapes cannot show a different head split.
        problems.append(f"num_attention_heads {config['num_attention_heads']} vs model.vision_heads {heads}")
    if problems:
        raise ValueError(f"{d}: the checkpoint does not fit the image encoder: {'; '.join(problems)}. "
                         "Set the model.vision_* sizes to the checkpoint's or use a matching checkpoint")


def _grid_side(rows: int, what: str) -> int:
    """Patch rows -> side of the square grid."""
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{what}: {rows} patch positions do not form a square grid")
    return side


def resize_positions(pos: Tensor, rows: int, d: "str | Path") -> Tensor:
    """[1, 1+P, W] -> [1, 1+rows, W]: the cls position kept, the P patch positions resized
    bicubically on their 2-D grid (ALBEF's `interpolate_pos_embed`)."""
    if pos.dim() != 3 or pos.shape[1] < 2:
        raise ValueError(f"{d}: position embeddings of shape {tuple(pos.shape)}; expected [1, 1+P, W]")
    old = _grid_side(pos.shape[1] - 1, str(d))
    new = _grid_side(rows, "model")
    if old == new:
        return pos
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, W, old, old]
    # fp32: bicubic has no half-precision kernel on every device, and rounding twice helps no one.
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)  # [1, W, new, new]
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)  # [1, new², W]
    logger.info("%s: position grid %dx%d interpolated to %dx%d", d, old, old, new, new)
    return torch.cat([pos[:, :1], grid], dim=1)  # [1, 1+new², W]


def _check_complete(sd: Mapping[str, Tensor], ours: Mapping[str, Tensor], d: Path) -> None:
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise ValueError(f"{d} does not match the image encoder: missing {listed(missing)}; unexpected "
                         f"{listed(unexpected)}. Use a plain ViT checkpoint (cls token, absolute positions, "
                         "qkv bias, final LayerNorm) of the model's sizes")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{d}: shape mismatch (file vs model) in {listed(bad)}; check the model.vision_* sizes")


def _warn_config(config: dict, expected: Mapping[str, object], source: Path) -> None:
    """Settings that change the outputs without changing any shape: warn, do not refuse."""
    for field, ours in expected.items():
        if config.get(field) not in (None, ours):
            logger.warning("%s: %s=%r, but the model uses %r", source, field, config[field], ours)


def load_vit_directory(vit: nn.Module, path: PathLike) -> List[str]:
    """Initialise `vit` (a ViTModel without pooler) from a local Hugging Face or timm ViT directory.

    Strict: every tensor of `vit` must come from the checkpoint; only classification heads and
    poolers may be left over. Returns those ignored checkpoint keys. Never downloads anything.
    """
    d = existing_path(path, "init_from_vit", is_dir=True)
    config = read_config_json(d)
    sd, ignored = _to_file_names(_read_weights(d), d)
    ours = vit.state_dict()
    _check_vit_sizes(sd, ours, config, vit, d)
    if POS in sd:
        sd[POS] = resize_positions(sd[POS], ours[POS].shape[1] - 1, d)
    sd = _to_module_names(sd, list(ours))
    _check_complete(sd, ours, d)
    vit.load_state_dict(sd, strict=True)
    vit_cfg = getattr(vit, "config", None)
    if vit_cfg is not None:
        _warn_config(config, {"hidden_act": vit_cfg.hidden_act, "layer_norm_eps": vit_cfg.layer_norm_eps}, d)
    logger.info("init_from_vit %s: loaded %d tensors; ignored %s", d, len(sd), listed(ignored))
    return ignored


# ---------------------------------------------------------------------------- BERT


def _text_sizes(enc: nn.Module) -> Dict[str, int]:
    """The text encoder's sizes, named as BERT's config.json names them."""
    first = (list(enc.layer) + list(enc.fusion))[0]
    return {
        "hidden_size": enc.embeddings.word_embeddings.embedding_dim,
        "vocab_size": enc.embeddings.word_embeddings.num_embeddings,
        "num_attention_heads": first.attention.self.num_heads,
        "intermediate_size": first.intermediate.dense.out_features,
        "max_position_embeddings": enc.embeddings.position_embeddings.num_embeddings,
    }


def _check_bert_sizes(config: dict, enc: nn.Module, source: Path) -> None:
    for field, ours in _text_sizes(enc).items():
        if config.get(field) != ours:
            raise ValueError(f"{source}: {field}={config.get(field)} but the text encoder has {ours}; set "
                             f"model.{field}={config.get(field)} or use a BERT checkpoint of the model's size")
    needed = len(enc.layer) + len(enc.fusion)
    layers = config.get("num_hidden_layers") or 0
    if layers < needed:
        raise ValueError(f"{source}: num_hidden_layers={layers} but model.text_layers + model.fusion_layers = "
                         f"{len(enc.layer)} + {len(enc.fusion)} = {needed}; lower them to sum to at most {layers}")
    if layers > needed:
        logger.warning("%s: BERT layers %d..%d are not used (the model has %d)", source, needed, layers - 1, needed)
    _warn_config(config, {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute"},
                 source)


def _text_encoder_key(key: str, text_layers: int, fusion_layers: int) -> Optional[str]:
    """A BERT key -> the text encoder's, or None when it has no place there."""
    key = rename_legacy_layernorm(key.removeprefix("bert."))
    layer = _BERT_LAYER_KEY.match(key)
    if layer:
        i, rest = int(layer.group(1)), layer.group(2)
        if i < text_layers:
            return f"layer.{i}.{rest}"
        return f"fusion.{i - text_layers}.{rest}" if i < text_layers + fusion_layers else None
    if key.startswith(("embeddings.", "cls.predictions.transform.")) or key == "cls.predictions.bias":
        return key
    return None  # pooler, NSP head, tied decoder copies, buffers, cross-attention of BERT decoders


def _check_tied_decoder(sd: Mapping[str, Tensor], source: Path) -> None:
    """Our MLM decoder is the word-embedding matrix; a file whose decoder differs would lose it."""
    dec = next((v for k, v in sd.items() if k.endswith("cls.predictions.decoder.weight")), None)
    emb = next((v for k, v in sd.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if dec is not None and emb is not None and not torch.equal(dec, emb):
        raise ValueError(f"{source}: cls.predictions.decoder.weight differs from the word embeddings; the text "
                         "encoder ties them, so this checkpoint's MLM head cannot be loaded as it is")


def _check_text_complete(to_load: Mapping[str, Tensor], ours: Mapping[str, Tensor], d: Path) -> List[str]:
    """Every tensor but the cross-attention (and the MLM head when the file has none) must
    come from the file; returns the ones left at their initial values."""
    has_head = any(k.startswith("cls.") for k in to_load)
    left = [k for k in ours if k not in to_load]
    missing = [k for k in left if ".crossattention." not in k and (has_head or not k.startswith("cls."))]
    if missing:
        raise ValueError(f"{d}: no BERT weights for {listed(missing)}; expected a complete Hugging Face BERT "
                         "(keys like [bert.]encoder.layer.0.attention.self.query.weight)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in to_load.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(f"{d}: shape mismatch (file vs model) in {listed(bad)}; check the model sizes")
    return left


def load_bert_into_text_encoder(text_encoder: nn.Module, path: PathLike) -> List[str]:
    """Initialise ALBEF's TextEncoder from a local Hugging Face BERT directory.

    BERT layers 0..T-1 -> `layer`, T..T+F-1 -> `fusion[k]`'s attention, intermediate and
    output; embeddings; the MLM head `cls.predictions.*` when the file has it. Returns the
    text-encoder keys left at their initial values (the cross-attention, and the MLM head
    when absent). Never downloads anything.
    """
    d = existing_path(path, "init_from_bert", is_dir=True)
    cfg_file = existing_path(d / "config.json", "init_from_bert config")
    _check_bert_sizes(read_config_json(d), text_encoder, cfg_file)
    with reading_weights(d):
        sd = plain_state_dict(read_bert_weights(d), d)
    _check_tied_decoder(sd, d)
    ours = text_encoder.state_dict()
    to_load, ignored = {}, []
    for key, value in sd.items():
        name = _text_encoder_key(key, len(text_encoder.layer), len(text_encoder.fusion))
        if name in ours:
            to_load[name] = value
        else:
            ignored.append(key)
    left = _check_text_complete(to_load, ours, d)
    text_encoder.load_state_dict(to_load, strict=False)
    logger.info("init_from_bert %s: loaded %d tensors; left at their initial values %s; ignored %s",
                d, len(to_load), listed(left), listed(ignored))
    return left
