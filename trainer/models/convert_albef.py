"""ALBEF run checkpoints <-> the key names of ALBEF's own `ALBEF` pretraining model
(docs/models.md, "ALBEF checkpoint export").

Ours -> ALBEF's, by part (the teacher's parts get ALBEF's `_m` suffix):

- image encoder: our transformers ViT -> ALBEF's timm-style ViT (`cls_token`, `pos_embed`,
  `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`),
  q, k and v fused into `qkv` — the inverse of the timm mapping `init_from_vit` reads;
- text encoder: `text_encoder.{embeddings,layer.{i},fusion.{j}}` -> ALBEF's
  `text_encoder.bert.{embeddings,encoder.layer.{i},encoder.layer.{text_layers + j}}`, the MLM head
  `text_encoder.cls.*` as is, plus what ALBEF's BertForMaskedLM also stores: the tied decoder
  (`cls.predictions.decoder.weight` = the word embeddings, `.bias` = `cls.predictions.bias`) and
  the `position_ids` buffer;
- `vision_proj`, `text_proj`, `itm_head` as is; `temp` [1] -> ALBEF's 0-d scalar;
- the teacher's queues `queues.{image_queue,text_queue,ptr}` -> `image_queue`, `text_queue`,
  `queue_ptr` ([1], long).

A retrieval fine-tuning model (no MLM head; `queues.idx_queue`) gets the names of ALBEF's retrieval model
instead: its text encoders are BertModels (`text_encoder.{embeddings,encoder.layer.{i}}`, no `bert.`, no
`cls.*`), and `idx_queue` is [1, K]. A VE model gets those of ALBEF's VE model: the same text encoders,
`cls_head.*` as is, no projections, ITM head or temperature, and its teacher as `*_m` (`cls_head_m` too); an
NLVR2 model the same with its 18-layer text encoder (`encoder.layer.{6..17}` the fusion layers), and a
text-assignment model that encoder, `vision_proj` and `ta_head` (ALBEF's `model_pretrain_nlvr`). A VQA model
gets those of ALBEF's `model_vqa`: the text encoder as above and the answer decoder as a BertLMHeadModel
(`text_decoder.bert.{embeddings,encoder.layer.{i}}`, `text_decoder.cls.*` with the tied decoder copies).

`import_albef_state_dict` is the inverse of both (and refuses tied copies that differ).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from trainer.models.albef_init import _TIMM_BLOCK, _TIMM_TOP, _from_hf, _from_timm, _to_module_names
from trainer.models.weights import listed

StateDict = Dict[str, Tensor]

ALBEF_MARKER = "visual_encoder.patch_embed.proj.weight"
"""A key only ALBEF's own files have (ours: visual_encoder.embeddings.patch_embeddings...)."""
OUR_MARKER = "visual_encoder.embeddings.patch_embeddings.projection.weight"
_DECODER = "cls.predictions.decoder."
_POSITION_IDS = "bert.embeddings.position_ids"
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_OUR_TEXT_LAYER = re.compile(r"^(layer|fusion)\.(\d+)\.(.+)$")
_ALBEF_TEXT_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")
_HEADS = ("itm_head", "ta_head")
"""Student-only heads, named as ALBEF's (`ta_head`: NLVR2's text-assignment model)."""
_AS_IS = ("vision_proj", "text_proj", "cls_head")
"""Parts of the student and the teacher named as ALBEF's (`cls_head`: its VE and NLVR2 models)."""
_ENCODERS = ("visual_encoder", "text_encoder", "text_decoder")
"""Parts renamed part by part (`text_decoder`: VQA's answer decoder)."""
_QUEUES = {"queues.image_queue": "image_queue", "queues.text_queue": "text_queue", "queues.ptr": "queue_ptr",
           "queues.idx_queue": "idx_queue"}
_RESHAPED = {"queues.ptr": (1,), "queues.idx_queue": (1, -1)}
"""Ours -> ALBEF's shape: the pointer [1] (ours 0-d), the image indices [1, K] (ours [K])."""
_IMPORTED_SHAPE = {"queues.ptr": (), "queues.idx_queue": (-1,)}


def _part(sd: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------------------- ViT


def vit_to_albef(sd: Mapping[str, Tensor]) -> StateDict:
    """Our ViT (transformers module names, any version) -> ALBEF's timm-style names."""
    files, ignored = _from_hf(sd)
    assert not ignored, ignored  # our encoder has no classifier or pooler
    top = {hf: timm for timm, hf in _TIMM_TOP.items()}
    block = {hf: timm for timm, hf in _TIMM_BLOCK.items()}
    out: StateDict = {}
    for key, value in files.items():
        qkv, layer = _HF_QKV.match(key), _HF_LAYER.match(key)
        if key in top:
            out[top[key]] = value
        elif qkv:
            if qkv.group(2) == "query":  # q, k, v stacked along dim 0, as timm's qkv
                parts = [files[f"encoder.layer.{qkv.group(1)}.attention.attention.{p}.{qkv.group(3)}"]
                         for p in ("query", "key", "value")]
                out[f"blocks.{qkv.group(1)}.attn.qkv.{qkv.group(3)}"] = torch.cat(parts, dim=0)  # [3W, W] / [3W]
        elif layer and any(layer.group(2).startswith(p) for p in block):
            hf = next(p for p in block if layer.group(2).startswith(p))
            out[f"blocks.{layer.group(1)}.{block[hf]}{layer.group(2)[len(hf):]}"] = value
        else:
            raise ValueError(f"image encoder key {key!r} has no ALBEF name")
    return out


def vit_from_albef(sd: Mapping[str, Tensor], module_keys: List[str]) -> StateDict:
    """ALBEF's timm-style ViT -> our module names (`module_keys`: our encoder's keys, which say the
    transformers naming in use)."""
    files, ignored = _from_timm(sd)
    if ignored:
        raise ValueError(f"image encoder keys with no counterpart in ours: {listed(ignored)}")
    return _to_module_names(files, module_keys)


# ---------------------------------------------------------------------------- text encoder


def text_to_albef(sd: Mapping[str, Tensor], text_layers: int, max_positions: int) -> StateDict:
    """Our text encoder (`embeddings`, `layer.i`, `fusion.j`, and `cls` in pretraining) -> ALBEF's
    BertForMaskedLM names, or without an MLM head its BertModel's (the retrieval model: no `bert.`)."""
    if "cls.predictions.bias" not in sd:
        bert = _text_to_bert(sd, text_layers, max_positions)
        return {k[len("bert."):]: v for k, v in bert.items()}
    return _text_to_bert(sd, text_layers, max_positions) | {
        _DECODER + "weight": sd["embeddings.word_embeddings.weight"].detach().clone(),
        _DECODER + "bias": sd["cls.predictions.bias"].detach().clone()}


def _text_to_bert(sd: Mapping[str, Tensor], text_layers: int, max_positions: int) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        layer = _OUR_TEXT_LAYER.match(key)
        if key.startswith("embeddings."):
            out["bert." + key] = value
        elif layer:
            index = int(layer.group(2)) + (text_layers if layer.group(1) == "fusion" else 0)
            out[f"bert.encoder.layer.{index}.{layer.group(3)}"] = value
        elif key.startswith("cls."):
            out[key] = value
        else:
            raise ValueError(f"text encoder key {key!r} has no ALBEF name")
    out[_POSITION_IDS] = torch.arange(max_positions).unsqueeze(0)  # [1, P], a buffer ALBEF's BERT saves
    return out


def text_from_albef(sd: Mapping[str, Tensor]) -> StateDict:
    """ALBEF's BertForMaskedLM, or the BertModel of its downstream models (no `bert.`), -> our text
    encoder; the fusion layers are those with cross-attention."""
    sd = {("bert." + k if k.startswith(("embeddings.", "encoder.")) else k): v for k, v in sd.items()}
    matches = [m for m in map(_ALBEF_TEXT_LAYER.match, sd) if m]
    fused = {int(m.group(1)) for m in matches if m.group(2).startswith("crossattention.")}
    text_layers = min(fused, default=max((int(m.group(1)) for m in matches), default=-1) + 1)
    for tied, source in ((_DECODER + "weight", "bert.embeddings.word_embeddings.weight"),
                         (_DECODER + "bias", "cls.predictions.bias")):
        if tied in sd and source in sd and not torch.equal(sd[tied], sd[source]):
            raise ValueError(f"{tied} differs from {source}; our model ties them, so one would be lost")
    out: StateDict = {}
    for key, value in sd.items():
        layer = _ALBEF_TEXT_LAYER.match(key)
        if key in (_POSITION_IDS, _DECODER + "weight", _DECODER + "bias"):
            continue
        if key.startswith("bert.embeddings."):
            out[key[len("bert."):]] = value
        elif layer:
            index = int(layer.group(1))
            name = f"fusion.{index - text_layers}" if index >= text_layers else f"layer.{index}"
            out[f"{name}.{layer.group(2)}"] = value
        elif key.startswith("cls."):
            out[key] = value
        else:
            raise ValueError(f"text encoder key {key!r} has no counterpart in ours")
    return out


# ---------------------------------------------------------------------------- whole model


def export_albef_state_dict(student: Mapping[str, Tensor], teacher: Optional[Mapping[str, Tensor]]) -> StateDict:
    """Our student (+ teacher.pt, when given) -> the state dict of ALBEF's `ALBEF` pretraining model, or of
    its retrieval model (`model_retrieval.ALBEF`) for a retrieval fine-tuning run (no MLM head, `idx_queue`)."""
    if OUR_MARKER not in student:
        raise ValueError(f"not an ALBEF model of ours: no {OUR_MARKER}")
    text_layers = len({m.group(2) for m in map(_OUR_TEXT_LAYER.match, _part(student, "text_encoder")) if m
                       and m.group(1) == "layer"})
    max_positions = student["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    if teacher is not None and any(k.startswith("model.") for k in teacher):  # a VE run's teacher: a whole model
        teacher = {k.removeprefix("model."): v for k, v in teacher.items()}
    out: StateDict = {}
    for suffix, sd in (("", student), ("_m", teacher or {})):
        out.update({f"visual_encoder{suffix}.{k}": v for k, v in vit_to_albef(_part(sd, "visual_encoder")).items()})
        for name in _AS_IS:
            out.update({f"{name}{suffix}.{k}": v for k, v in _part(sd, name).items()})
        text = text_to_albef(_part(sd, "text_encoder"), text_layers, max_positions) if sd else {}
        out.update({f"text_encoder{suffix}.{k}": v for k, v in text.items()})
        decoder = _part(sd, "text_decoder")  # VQA's answer decoder: a BertLMHeadModel, cross-attention everywhere
        if decoder:
            out.update({f"text_decoder{suffix}.{k}": v for k, v in text_to_albef(decoder, 0, max_positions).items()})
    for head in _HEADS:
        out.update({f"{head}.{k}": v for k, v in _part(student, head).items()})
    if "temp" in student:  # ALBEF's temperature is a 0-d parameter; the VE model has none
        out["temp"] = student["temp"].reshape(())
    for ours, theirs in _QUEUES.items():
        if teacher is not None and ours in teacher:  # the index queue only in retrieval fine-tuning
            out[theirs] = teacher[ours].reshape(_RESHAPED[ours]) if ours in _RESHAPED else teacher[ours]
    named = tuple(f"{p}." for p in _ENCODERS + _AS_IS + _HEADS) + ("temp",)
    leftover = [k for k in student if not k.startswith(named)]
    if leftover:
        raise ValueError(f"keys with no ALBEF name: {listed(leftover)}")
    return out


def import_albef_state_dict(sd: Mapping[str, Tensor], vit_module_keys: List[str]) -> Tuple[StateDict, StateDict]:
    """ALBEF's state dict (its pretraining, retrieval or VE model) -> (our student, our teacher; empty without
    the `_m` parts).
    `vit_module_keys`: our image encoder's keys (the transformers naming in use)."""
    if ALBEF_MARKER not in sd:
        raise ValueError(f"not an ALBEF state dict: no {ALBEF_MARKER}")
    models: List[StateDict] = []
    for suffix in ("", "_m"):
        if suffix and f"visual_encoder{suffix}.patch_embed.proj.weight" not in sd:
            models.append({})
            continue
        out: StateDict = {}
        vit = vit_from_albef(_part(sd, f"visual_encoder{suffix}"), vit_module_keys)
        out.update({f"visual_encoder.{k}": v for k, v in vit.items()})
        for text in ("text_encoder", "text_decoder"):
            out.update({f"{text}.{k}": v for k, v in text_from_albef(_part(sd, f"{text}{suffix}")).items()})
        for name in _AS_IS:
            out.update({f"{name}.{k}": v for k, v in _part(sd, f"{name}{suffix}").items()})
        models.append(out)
    student, teacher = models
    for head in _HEADS:
        student.update({f"{head}.{k}": v for k, v in _part(sd, head).items()})
    if "temp" in sd:  # not in ALBEF's VE model
        student["temp"] = sd["temp"].reshape(1)
    if teacher:
        for ours, theirs in _QUEUES.items():
            if theirs in sd:
                teacher[ours] = sd[theirs].reshape(_IMPORTED_SHAPE.get(ours, sd[theirs].shape))
    prefixes = tuple(f"{p}{s}." for p in _ENCODERS + _AS_IS for s in ("", "_m")) + tuple(f"{h}." for h in _HEADS)
    leftover = [k for k in sd if not k.startswith(prefixes) and k not in ("temp", *_QUEUES.values())]
    if leftover:
        raise ValueError(f"keys with no counterpart in ours: {listed(leftover)}")
    return student, teacher


def is_albef_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """Our ALBEF student's names (`OUR_MARKER`)."""
    return OUR_MARKER in sd


__all__ = ["export_albef_state_dict", "import_albef_state_dict", "is_albef_state_dict", "ALBEF_MARKER"]
