"""Where an ALBEF fine-tuning run starts (docs/downstream.md, "ALBEF retrieval"): the student and the
momentum model (with its queues) of a vlpt ALBEF pretraining checkpoint, or of ALBEF's own checkpoint file.

Rules (ALBEF's `load_state_dict(strict=False)` after its own renames, made explicit): the MLM head
(`text_encoder.cls.*`) is dropped, the patch position grid is resized bicubically to the model's image
size, every other tensor must be present with the model's shape; the teacher's image-index queue is
always fresh (ALBEF: `idx_queue` is not in a pretraining checkpoint). A source without a momentum model
leaves the teacher a copy of the loaded student, with fresh queues.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from trainer.config_files import ConfigError
from trainer.models.albef_init import resize_positions
from trainer.models.convert_albef import ALBEF_MARKER, import_albef_state_dict, is_albef_state_dict
from trainer.models.convert_cli import (load_state_dict_file, read_deepspeed_checkpoint, read_teacher,
                                        resolve_checkpoint_dir)
from trainer.models.weights import listed

log = logging.getLogger("vlpt")
StateDict = dict[str, Tensor]
Adapt = Callable[[StateDict, str], StateDict]

DROPPED = ("text_encoder.cls.",)
"""Pretraining tensors a retrieval model has no place for: the MLM head (a VE model names its own)."""
FRESH = ("queues.idx_queue",)
"""Fine-tuning state that never comes from the source."""
POSITIONS = "visual_encoder.embeddings.position_embeddings"


def read_albef_weights(path: str, key: str, vit_module_keys: list[str]) -> tuple[StateDict, Optional[StateDict], str]:
    """(student, teacher or None, where) in our names, from a vlpt run / checkpoint folder (its
    teacher.pt beside) or a state-dict file (ours or ALBEF's). `key` names the config key for errors."""
    p = Path(path)
    if p.is_dir():
        tag_dir = resolve_checkpoint_dir(p)
        student, kind = read_deepspeed_checkpoint(tag_dir)
        return dict(student), read_teacher(tag_dir), f"{tag_dir} ({kind})"
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file or folder; name a vlpt ALBEF run folder, a checkpoint "
                          "folder or a state-dict file (ours or ALBEF's)")
    sd = load_state_dict_file(p)
    if ALBEF_MARKER in sd:
        try:
            student, teacher = import_albef_state_dict(sd, vit_module_keys)
        except ValueError as e:
            raise ConfigError(f"{key}={path}: {e}") from None
        return student, teacher or None, f"{p} (ALBEF state dict)"
    if not is_albef_state_dict(sd):
        raise ConfigError(f"{key}={path}: not an ALBEF model's state dict (no image encoder keys)")
    return sd, None, f"{p} (vlpt state dict, student only)"


def load_into(module: nn.Module, sd: Mapping[str, Tensor], what: str, fresh: tuple[str, ...] = (),
              new: tuple[str, ...] = (), dropped: tuple[str, ...] = DROPPED) -> list[str]:
    """Load `sd` into `module` by the rules above; returns the keys dropped. `fresh`: never loaded (state that
    starts anew); `new`: loaded when `sd` has them, else left as initialised (a new head); `dropped`: prefixes
    of `sd` the module has no place for. ValueError naming what is missing, left over or of another shape."""
    sd = {k: v for k, v in sd.items() if not k.startswith(fresh)}
    gone = [k for k in sd if k.startswith(dropped)]
    sd = {k: v for k, v in sd.items() if k not in gone}
    ours = module.state_dict()
    if POSITIONS in sd and POSITIONS in ours:
        sd[POSITIONS] = resize_positions(sd[POSITIONS], ours[POSITIONS].shape[1] - 1, what)
    missing = [k for k in ours if k not in sd and not k.startswith(fresh + new)]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise ValueError(f"{what} does not fit the model: missing {listed(missing)}; unexpected {listed(unexpected)}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{what}: shape mismatch (file vs model) in {listed(bad)}; check the model section "
                         "(model.queue_size for the queues)")
    module.load_state_dict(sd, strict=False)  # only `fresh` and `new` keys are left out, checked above
    return gone


@dataclass
class Loaded:
    """What `read_into` read besides the student it loaded."""

    teacher: Optional[StateDict]
    """The source's momentum model and queues (teacher.pt, or ALBEF's `_m` parts), None without one."""
    where: str
    student_keys: list[str]
    dropped: list[str]


def read_into(model: nn.Module, path: str, key: str, adapt: Optional[Adapt] = None, **rules) -> Loaded:
    """Read the weights at `path` (named by config key or flag `key`) and load the student into `model` by
    `load_into`'s `rules`, after `adapt(state dict, what)` when given (the teacher is returned unadapted);
    ValueError naming what does not fit."""
    student, teacher, where = read_albef_weights(path, key, list(model.visual_encoder.state_dict()))
    what = f"{key} {path}" if key.startswith("--") else f"{key}={path}"
    if adapt is not None:
        student = adapt(student, what)
    dropped = load_into(model, student, what, **rules)
    return Loaded(teacher, where, list(student), dropped)


_FUSION = re.compile(r"^text_encoder\.fusion\.(\d+)\.(.+)$")
_SHARED = re.compile(r"^crossattention\.self\.(key|value)\.")


def two_image_layers(fusion_layers: int) -> Adapt:
    """The `adapt` of NLVR2's two-image text encoder (2 x `fusion_layers` fusion layers): a one-image source's
    fusion layer k becomes layers 2k and 2k+1 (ALBEF's `Pretrain_nlvr.py`); a two-image source (a text-
    assignment or NLVR2 run) is kept, with the shared key/value of a layer pair filled in from its twin
    where a checkpoint stored one name of the pair only."""

    def adapt(sd: StateDict, what: str) -> StateDict:
        layers = {int(m.group(1)) for m in map(_FUSION.match, sd) if m}
        if layers == set(range(fusion_layers)):
            out = {k: v for k, v in sd.items() if not _FUSION.match(k)}
            for key, value in sd.items():
                if m := _FUSION.match(key):
                    for copy in (2 * int(m.group(1)), 2 * int(m.group(1)) + 1):
                        out[f"text_encoder.fusion.{copy}.{m.group(2)}"] = value
            return out
        if layers != set(range(2 * fusion_layers)):
            raise ValueError(f"{what}: its text encoder has fusion layers {sorted(layers)}; NLVR2 reads a one-image "
                             f"model ({fusion_layers} fusion layers) or a two-image one ({2 * fusion_layers})")
        out = dict(sd)
        for key, value in sd.items():
            m = _FUSION.match(key)
            if m and _SHARED.match(m.group(2)):
                twin = f"text_encoder.fusion.{int(m.group(1)) ^ 1}.{m.group(2)}"
                out.setdefault(twin, value)
        return out

    return adapt


def load_for_evaluation(model: nn.Module, checkpoint: str, device: torch.device, dtype: torch.dtype,
                        hint: str = "", **rules) -> nn.Module:
    """`vlpt evaluate`'s model: the student at `checkpoint` loaded into `model`, moved and in eval mode; a
    checkpoint that does not fit is one ConfigError line (ending with `hint`)."""
    try:
        loaded = read_into(model, checkpoint, "--checkpoint", **rules)
    except ValueError as e:
        raise ConfigError(f"{e}{hint}") from None
    log.info("evaluating %s", loaded.where)
    return model.to(device, dtype).eval()


_DECODER_SOURCE = re.compile(r"^text_encoder\.(embeddings\.|fusion\.|cls\.)(.*)$")


def decoder_from_fusion(sd: StateDict, what: str) -> StateDict:
    """The `adapt` of ALBEF's VQA model: a source without an answer decoder (a pretraining checkpoint or its
    teacher) gives it the text encoder's embeddings, fusion layers (k -> decoder layer k) and MLM head, which
    then leaves the encoder (ALBEF's `VQA.py`); a source with one (a VQA run) is kept."""
    if any(k.startswith("text_decoder.") for k in sd):
        return sd
    if not any(k.startswith("text_encoder.cls.") for k in sd):
        raise ValueError(f"{what}: VQA's answer decoder starts from the text encoder's fusion layers and MLM head, "
                         "and this checkpoint has no MLM head; start from an ALBEF pretraining run or file")
    out = {k: v for k, v in sd.items() if not k.startswith("text_encoder.cls.")}
    for key, value in sd.items():
        if m := _DECODER_SOURCE.match(key):
            out[f"text_decoder.{m.group(1)}{m.group(2)}"] = value
    return out
