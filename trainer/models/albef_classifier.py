"""ALBEF's classification models for downstream tasks (docs/downstream.md, "ALBEF visual entailment",
"ALBEF NLVR2"): the image encoder, the text encoder's text and fusion layers (no MLM head, no ITC
projections, no ITM head) and `cls_head` on the fused [CLS], as ALBEF's `model_ve.ALBEF`; with two images
per example, NLVR2's `model_nlvr.ALBEF`, whose fusion layers alternate between the two pictures (twice as
many, the key/value Linears of each pair one parameter). Their teacher is an EMA copy of the whole model
(ALBEF's pairs: visual_encoder, text_encoder, cls_head), kept outside the engine in fp32 (`MomentumCopy`).

`TextAssignment` is NLVR2's text-assignment pretraining model (`model_pretrain_nlvr.ALBEF`): the same
two-image encoder telling which of two pictures a caption belongs to, or neither.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.albef import TextEncoder, vision_transformer, vit_tokens
from trainer.models.config import AlbefConfig
from trainer.models.momentum import ema_update


def two_image_text_encoder(cfg: AlbefConfig) -> TextEncoder:
    """NLVR2's text encoder: 2 x cfg.fusion_layers fusion layers, layer 2j reading the left image and 2j+1
    the right, each pair's cross-attention key and value one parameter (ALBEF's `share_cross_attention`:
    the even layer takes the odd one's, so both names stay in the state dict)."""
    encoder = TextEncoder(cfg, mlm_head=False, fusion_layers=2 * cfg.fusion_layers)
    for j in range(cfg.fusion_layers):
        left, right = (encoder.fusion[2 * j + s].crossattention.self for s in (0, 1))
        for name in ("key", "value"):
            getattr(left, name).weight = getattr(right, name).weight
            getattr(left, name).bias = getattr(right, name).bias
    return encoder


class AlbefClassifier(nn.Module):
    """`forward(batch, task, *args)` runs `task(self, batch, *args)` inside the module the engine wraps.
    `images`: pictures per example (1: VE; 2: NLVR2, `pixels` holding all left pictures, then all right)."""

    TEACHER_PARTS = ("visual_encoder", "text_encoder", "cls_head")
    """What the momentum copy moves: everything (ALBEF's model pairs)."""

    def __init__(self, cfg: AlbefConfig, num_classes: int, images: int = 1) -> None:
        super().__init__()
        if images not in (1, 2):
            raise ValueError(f"an ALBEF classifier reads 1 or 2 pictures per example, not {images}")
        self.config = cfg
        self.images = images
        self.visual_encoder = vision_transformer(cfg)
        self.text_encoder = two_image_text_encoder(cfg) if images == 2 else TextEncoder(cfg, mlm_head=False)
        # PyTorch's default Linear init, as ALBEF's new heads (not BERT's N(0, 0.02)).
        self.cls_head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.ReLU(),
                                      nn.Linear(cfg.hidden_size, num_classes))

    def forward(self, batch: dict, task: Callable, *args):
        return task(self, batch, *args)

    def logits(self, batch: dict) -> Tensor:
        """[B, C] class logits of (picture(s), text) examples, in fp32; one ViT pass over all pictures."""
        image = vit_tokens(self.visual_encoder, batch["pixels"], self.cls_head[0].weight.dtype)  # [nB, 1+P, Hv]
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [B, L, H]
        fused = self.text_encoder.fuse(text, batch["attn_mask"], image.chunk(self.images))  # [B, L, H]
        return self.cls_head(fused[:, 0]).float()


class MomentumCopy(nn.Module):
    """The momentum model of ALBEF's downstream models (classifiers, VQA): an fp32 copy of the whole student,
    its `TEACHER_PARTS` moved by EMA once per optimizer step."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.momentum = student.config.momentum
        self.parts: tuple[str, ...] = student.TEACHER_PARTS
        self.model = copy.deepcopy(student).float().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One part at a time, so ZeRO-3 gathers one part's parameters at once."""
        ema_update([(getattr(student, n), getattr(self.model, n)) for n in self.parts], self.momentum)

    @torch.no_grad()
    def logits(self, batch: dict) -> Tensor:
        return self.model.logits(batch)


TA_LABELS = ("left", "right", "neither")
"""Text assignment's classes: the caption belongs to the left picture, the right one, or neither."""
TA_TEMPERATURE = 0.07
"""The fixed temperature of the picture similarities partners are drawn from (ALBEF's)."""


class TextAssignment(nn.Module):
    """NLVR2's text-assignment pretraining model: image encoder, `vision_proj` (read, never trained: the
    partners' similarities are taken without gradient, as ALBEF's), the two-image text encoder and
    `ta_head` Linear(H, 3) on the fused [CLS] (PyTorch's default init)."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual_encoder = vision_transformer(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim).requires_grad_(False)
        self.text_encoder = two_image_text_encoder(cfg)
        self.ta_head = nn.Linear(cfg.hidden_size, len(TA_LABELS))

    def forward(self, batch: dict, task: Callable, *args):
        return task(self, batch, *args)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        return vit_tokens(self.visual_encoder, pixels, self.ta_head.weight.dtype)  # [B, 1+P, Hv]

    @torch.no_grad()
    def partner_weights(self, image: Tensor) -> Tensor:
        """[B, B] fp32: softmax over the batch of the pictures' similarity / 0.07, the diagonal zeroed; uniform
        with `model.itm_negatives: random` (partners are TA's negatives)."""
        feat = F.normalize(self.vision_proj(image[:, 0]).float(), dim=-1)  # [B, D]
        sim = feat @ feat.t() / TA_TEMPERATURE  # [B, B]
        if self.config.itm_negatives == "random":
            sim = torch.zeros_like(sim)
        return torch.softmax(sim, dim=1).fill_diagonal_(0)

    def logits(self, batch: dict, image: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """[B, 3] fp32 logits of caption b against pictures (left[b], right[b]) of `image` [B, 1+P, Hv]."""
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [B, L, H]
        fused = self.text_encoder.fuse(text, batch["attn_mask"], (image[left], image[right]))  # [B, L, H]
        return self.ta_head(fused[:, 0]).float()


PREDICT_TASK = AlbefClassifier.logits
"""Scoring: the class logits of a batch."""
