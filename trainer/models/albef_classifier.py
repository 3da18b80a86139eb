"""ALBEF's classification model for downstream tasks (docs/downstream.md, "ALBEF visual entailment"): the
image encoder, the text encoder's text and fusion layers (no MLM head, no ITC projections, no ITM head)
and `cls_head` on the fused [CLS], as ALBEF's `model_ve.ALBEF`. Its teacher is an EMA copy of the whole
model (ALBEF's pairs: visual_encoder, text_encoder, cls_head), kept outside the engine in fp32.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from trainer.models.albef import TextEncoder, vision_transformer, vit_tokens
from trainer.models.config import AlbefConfig
from trainer.models.momentum import ema_update


class AlbefClassifier(nn.Module):
    """`forward(batch, task, *args)` runs `task(self, batch, *args)` inside the module the engine wraps."""

    def __init__(self, cfg: AlbefConfig, num_classes: int) -> None:
        super().__init__()
        self.config = cfg
        self.visual_encoder = vision_transformer(cfg)
        self.text_encoder = TextEncoder(cfg, mlm_head=False)
        # PyTorch's default Linear init, as ALBEF's new heads (not BERT's N(0, 0.02)).
        self.cls_head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.ReLU(),
                                      nn.Linear(cfg.hidden_size, num_classes))

    def forward(self, batch: dict, task: Callable, *args):
        return task(self, batch, *args)

    def logits(self, batch: dict) -> Tensor:
        """[B, C] class logits of (picture, text) pairs, in fp32."""
        image = vit_tokens(self.visual_encoder, batch["pixels"], self.cls_head[0].weight.dtype)  # [B, 1+P, Hv]
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [B, L, H]
        fused = self.text_encoder.fuse(text, batch["attn_mask"], image)  # [B, L, H]
        return self.cls_head(fused[:, 0]).float()


class ClassifierTeacher(nn.Module):
    """The momentum model: an fp32 copy of the whole classifier, moved by EMA once per optimizer step."""

    def __init__(self, student: AlbefClassifier) -> None:
        super().__init__()
        self.momentum = student.config.momentum
        self.model = copy.deepcopy(student).float().requires_grad_(False)

    PARTS = ("visual_encoder", "text_encoder", "cls_head")

    @torch.no_grad()
    def update(self, student: AlbefClassifier) -> None:
        """One part at a time, so ZeRO-3 gathers one part's parameters at once."""
        ema_update([(getattr(student, n), getattr(self.model, n)) for n in self.PARTS], self.momentum)

    @torch.no_grad()
    def logits(self, batch: dict) -> Tensor:
        return self.model.logits(batch)


PREDICT_TASK = AlbefClassifier.logits
"""Scoring: the class logits of a batch."""
