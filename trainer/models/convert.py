"""Checkpoint conversion between UNITER / Hugging Face BERT files and our model
(docs/models.md, "UNITER checkpoint compatibility").

Our state dict is UNITER's minus the two tied duplicates
(`cls.predictions.decoder.weight`, `feat_regress.weight`), which UNITER stores
as separate keys although they are the same tensors as their tie sources.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from trainer.models.weights import PathLike, existing_path, listed, read_bert_weights, rename_legacy_layernorm

logger = logging.getLogger(__name__)

WORD_EMB = "uniter.embeddings.word_embeddings.weight"
IMG_LINEAR = "uniter.img_embeddings.img_linear.weight"
MLM_DECODER = "cls.predictions.decoder.weight"
FEAT_REGRESS_WEIGHT = "feat_regress.weight"
# tied duplicate key in UNITER files -> the key of the tensor it is tied to
TIED_DUPLICATES = {
    MLM_DECODER: WORD_EMB,
    FEAT_REGRESS_WEIGHT: IMG_LINEAR,
}
_BERT_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_VOCAB_KEYS = (WORD_EMB, "cls.predictions.bias")


def import_uniter_state_dict(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """UNITER-format state dict -> our keys (legacy names fixed, tied duplicates dropped)."""
    out = {rename_legacy_layernorm(k): v for k, v in sd.items()}
    for dup, src in TIED_DUPLICATES.items():
        if dup not in out:
            continue
        if src not in out:
            raise ValueError(f"{dup} is present but its tie source {src} is missing")
        if not torch.equal(out[dup], out[src]):
            raise ValueError(
                f"{dup} differs from {src}; our model ties them, so this checkpoint "
                "cannot be loaded without losing one of them"
            )
        del out[dup]
    return out


def export_uniter_state_dict(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our state dict -> UNITER's full key set (tied duplicates added back as clones)."""
    missing = [src for src in TIED_DUPLICATES.values() if src not in sd]
    if missing:
        raise ValueError(f"cannot export a UNITER checkpoint: tie sources {missing} are missing")
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        # UNITER lists both duplicates right before the first feat_regress key;
        # keeping its order makes our files diff cleanly against the originals.
        if key.startswith("feat_regress.") and FEAT_REGRESS_WEIGHT not in out:
            _add_tied_duplicates(out, sd)
        out[key] = value
    _add_tied_duplicates(out, sd)
    return out


def _add_tied_duplicates(out: Dict[str, Tensor], sd: Mapping[str, Tensor]) -> None:
    for dup, src in TIED_DUPLICATES.items():
        if dup not in out:
            out[dup] = sd[src].detach().clone()


def _load_strict(model: nn.Module, sd: Mapping[str, Tensor], source: Path) -> None:
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: missing {listed(missing)}; "
            f"unexpected {listed(unexpected)}. Check the model config sizes and that "
            "this is a UNITER pretraining checkpoint"
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (file vs model) in {listed(bad)}; check the model config sizes")
    model.load_state_dict(sd, strict=True)


def load_uniter_checkpoint(model: nn.Module, path: PathLike) -> None:
    """Load a UNITER `model_step_*.pt` state dict into `model` (strict)."""
    p = existing_path(path, "init_from_uniter")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{p} is not a plain state dict (name -> tensor) as UNITER saves it")
    _load_strict(model, import_uniter_state_dict(sd), p)
    logger.info("loaded %d tensors from UNITER checkpoint %s", len(sd), p)


def save_uniter_checkpoint(model: nn.Module, path: PathLike) -> None:
    """Save `model` as a UNITER-named state dict (full key set, loadable by UNITER's code)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_uniter_state_dict(model.state_dict()), p)


def _check_bert_config(bert_cfg: Mapping, model_cfg: object, allow_vocab_resize: bool, source: Path) -> None:
    for field in _BERT_CONFIG_FIELDS:
        theirs, ours = bert_cfg.get(field), getattr(model_cfg, field)
        if theirs == ours:
            continue
        if field == "vocab_size" and allow_vocab_resize and theirs is not None:
            logger.warning("%s: vocab_size %s != model.vocab_size %s; copying the shared rows", source, theirs, ours)
            continue
        hint = " (or pass allow_vocab_resize=True to copy the shared rows)" if field == "vocab_size" else ""
        raise ValueError(
            f"{source}: {field}={theirs} but model.{field}={ours}; set model.{field} to match "
            f"or use a BERT checkpoint of the same size{hint}"
        )
    if bert_cfg.get("hidden_act", "gelu") != "gelu":
        logger.warning("%s: hidden_act=%r, but our encoder uses exact GELU", source, bert_cfg.get("hidden_act"))


def _map_bert_keys(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Hugging Face BERT keys -> ours; keys with no counterpart (NSP head, buffers) are dropped."""
    out = {}
    for key, value in sd.items():
        key = rename_legacy_layernorm(key.removeprefix("bert."))
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            out["uniter." + key] = value
        elif key.startswith("cls.predictions.transform.") or key == "cls.predictions.bias":
            out[key] = value
    return out


def _prefix_summary(keys: Sequence[str]) -> str:
    def prefix(k: str) -> str:
        parts = k.split(".")
        return ".".join(parts[:2]) if parts[0] in ("uniter", "cls") else parts[0]

    counts = Counter(prefix(k) for k in keys)
    return ", ".join(f"{p} ({n})" for p, n in counts.items()) or "none"


def load_bert_directory(model: nn.Module, path: PathLike, allow_vocab_resize: bool = False) -> List[str]:
    """Initialise `model` (a UniterForPretraining) from a local Hugging Face BERT directory.

    Returns the list of our keys that were loaded. Never downloads anything.
    """
    d = existing_path(path, "init_from_bert", is_dir=True)
    cfg_file = existing_path(d / "config.json", "init_from_bert config")
    _check_bert_config(json.loads(cfg_file.read_text()), model.config, allow_vocab_resize, cfg_file)
    ours = model.state_dict()
    to_load: Dict[str, Tensor] = {}
    for key, value in _map_bert_keys(read_bert_weights(d)).items():
        if key not in ours:
            continue
        if value.shape != ours[key].shape:
            if not (allow_vocab_resize and key in _VOCAB_KEYS):
                raise ValueError(f"{d}: {key} has shape {tuple(value.shape)}, model expects {tuple(ours[key].shape)}")
            resized = ours[key].clone()
            n = min(value.shape[0], resized.shape[0])
            resized[:n] = value[:n]
            value = resized
        to_load[key] = value
    if not to_load:
        raise ValueError(f"{d}: no BERT encoder weights found (expected keys like [bert.]encoder.layer.0...)")
    model.load_state_dict(to_load, strict=False)
    random_init = [k for k in ours if k not in to_load]
    logger.info(
        "init_from_bert %s: loaded %d of %d tensors; left at random init: %s",
        d, len(to_load), len(ours), _prefix_summary(random_init),
    )
    return list(to_load)
