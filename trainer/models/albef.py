"""ALBEF (docs/models.md, "ALBEF"): the student (a ViT image encoder, a BERT split into text layers and fusion
layers that cross-attend to the image tokens, 256-d projections for ITC, ITM and MLM heads,
the learned temperature) and its teacher (EMA copies of the encoders, projections and MLM
head, with the feature queues).

The teacher lives outside the DeepSpeed engine, in fp32 and whole on every rank: its EMA
then never rounds to bf16 (at momentum 0.995 a bf16 copy would stop moving), and ZeRO-3
needs no second partitioned model; the EMA gathers the student's partitioned parameters
(`ema_update`). The ALBEF recipe (trainer/recipes/albef.py) runs the teacher on all micro-batches
of a step first, so every micro-batch contrasts against the momentum features of the whole
global batch plus the queue, then hands each micro-batch's `TeacherTargets` to the student.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.masked_gather import masked_gather
from trainer.models.bert import (Attention, Intermediate, Layer, Output, SelfOutput, SelfAttention,
                                 extended_attention_mask, init_bert_weights)
from trainer.models.config import AlbefConfig, ModelConfig
from trainer.models.heads import MlmHead
from trainer.models.momentum import FeatureQueues, ema_update
from trainer.models.uniter import TextEmbeddings
from trainer.models.sharing import register_shared_parameters



def vision_transformer(cfg: AlbefConfig) -> nn.Module:
    """timm-style pre-LN ViT (LN eps 1e-6, qkv bias, final LN) from `transformers`."""
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              intermediate_size=cfg.vision_mlp, layer_norm_eps=1e-6, qkv_bias=True,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              initializer_range=cfg.initializer_range), add_pooling_layer=False)


def vit_tokens(vit: nn.Module, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 3, S, S] -> image tokens [B, 1+P, Hv]; under bf16/fp16 engines the inputs follow the weights' `dtype`."""
    return vit(pixel_values=pixels.to(dtype)).last_hidden_state


class CrossAttention(nn.Module):
    """`crossattention.self` + `.output` (BERT's names): text queries, image keys/values."""

    def __init__(self, cfg: ModelConfig, context_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(cfg, context_width)
        self.output = SelfOutput(cfg)

    def forward(self, hidden: Tensor, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """`mask`: additive key mask of the context (None: every image token is valid)."""
        return self.output(self.self(hidden, mask, image), hidden)  # [B, L, H]


class FusionLayer(nn.Module):
    """Self-attention over the text, cross-attention to the image, FFN (post-LN)."""

    def __init__(self, cfg: ModelConfig, context_width: int) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.crossattention = CrossAttention(cfg, context_width)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, hidden: Tensor, mask: Tensor, image: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        attn = self.crossattention(self.attention(hidden, mask), image, context_mask)  # [B, L, H]
        return self.output(self.intermediate(attn), attn)  # [B, L, H]


class TextEncoder(nn.Module):
    """Embeddings + text layers (unimodal) + fusion layers (with the image) + MLM head."""

    def __init__(self, cfg: AlbefConfig, mlm_head: bool = True, fusion_layers: Optional[int] = None,
                 text_layers: Optional[int] = None, context_width: Optional[int] = None) -> None:
        """Defaults: `cfg.fusion_layers`, `cfg.text_layers`, cross-attention to `cfg.vision_width` image tokens.
        NLVR2's two-image encoder has twice the fusion layers; VQA's answer decoder no text layers and
        cross-attends to the question's states (`context_width` = hidden)."""
        super().__init__()
        bert = cfg.bert()
        self.embeddings = TextEmbeddings(bert, padding_idx=cfg.pad_token_id)
        self.layer = nn.ModuleList(Layer(bert) for _ in range(cfg.text_layers if text_layers is None else text_layers))
        self.fusion = nn.ModuleList(FusionLayer(bert, context_width or cfg.vision_width)
                                    for _ in range(fusion_layers or cfg.fusion_layers))
        self.cls = MlmHead(cfg.hidden_size, cfg.vocab_size) if mlm_head else None
        self.apply(lambda m: init_bert_weights(m, cfg.initializer_range))

    def text(self, input_ids: Tensor, attn_mask: Tensor) -> Tensor:
        """[B, L] ids -> unimodal text states [B, L, H]."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)[None]  # [1, L]
        hidden = self.embeddings(input_ids, positions)
        mask = extended_attention_mask(attn_mask, hidden.dtype)  # [B, 1, 1, L]
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden

    def fuse(self, text: Tensor, attn_mask: Tensor, image: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """text [B, L, H] + image tokens [B, P, Hv] -> multimodal states [B, L, H]. Given n images' tokens,
        fusion layer k cross-attends to image k mod n (NLVR2: even layers the left image, odd the right)."""
        images = [image] if isinstance(image, Tensor) else list(image)
        mask = extended_attention_mask(attn_mask, text.dtype)
        for k, layer in enumerate(self.fusion):
            text = layer(text, mask, images[k % len(images)])
        return text

    def mlm_logits(self, fused: Tensor, mlm_index: Tensor) -> Tensor:
        """Logits [N, V] at the masked positions (flat indices into [B, L])."""
        return self.cls(masked_gather(fused, mlm_index), self.embeddings.word_embeddings.weight)


class Albef(nn.Module):
    """The student. `forward(batch, task, *args)` runs `task` inside the module, so one
    DeepSpeed engine serves training and retrieval."""

    TEACHER_PARTS = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    """What the teacher copies: all but the temperature and the ITM head (ALBEF)."""

    def __init__(self, cfg: AlbefConfig, mlm_head: bool = True) -> None:
        """`mlm_head=False`: ALBEF's retrieval model, whose text encoder has no MLM head."""
        super().__init__()
        self.config = cfg
        self.visual_encoder = vision_transformer(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_encoder = TextEncoder(cfg, mlm_head)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_weights(head, cfg.initializer_range)
        # [1], not ALBEF's 0-d scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))
        if mlm_head:
            register_shared_parameters([(self.text_encoder.cls, self.text_encoder.embeddings.word_embeddings.weight)])

    def forward(self, batch: dict, task: Callable, *args):
        """`task(self, batch, *args)`: the training losses (trainer/recipes/albef_tasks.py) or a
        retrieval pass (`Albef.embed`, `Albef.itm_score`), run inside the module the engine wraps."""
        return task(self, batch, *args)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        return vit_tokens(self.visual_encoder, pixels, self.vision_proj.weight.dtype)  # [B, 1+P, Hv]

    @torch.no_grad()
    def embed(self, batch: dict) -> dict[str, Tensor]:
        """Retrieval features of images (`pixels`) and/or texts (`input_ids`, `attn_mask`)."""
        out = {}
        if "pixels" in batch:
            image = self.image_tokens(batch["pixels"])  # [B, 1+P, Hv]
            out.update(image_tokens=image, image_feat=F.normalize(self.vision_proj(image[:, 0]).float(), dim=-1))
        if "input_ids" in batch:
            text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [B, L, H]
            out.update(text_states=text, text_feat=F.normalize(self.text_proj(text[:, 0]).float(), dim=-1))
        return out

    @torch.no_grad()
    def itm_score(self, batch: dict) -> Tensor:
        """Match logits [n] of n (text states, image tokens) pairs."""
        fused = self.text_encoder.fuse(batch["text_states"], batch["attn_mask"], batch["image_tokens"])
        return self.itm_head(fused[:, 0]).float()[:, 1]


class AlbefTeacher(nn.Module):
    """The momentum model and the queues: fp32, whole on every rank, outside the engine.

    Its parts are EMA copies of the student's TEACHER_PARTS (registered alike, so parameters
    pair up in order); saved in every checkpoint beside the engine's files."""

    def __init__(self, student: Albef, image_index_queue: bool = False) -> None:
        """`image_index_queue`: the queues also keep each feature's image index (retrieval fine-tuning)."""
        super().__init__()
        self.momentum = student.config.momentum
        for name in Albef.TEACHER_PARTS:
            setattr(self, name, copy.deepcopy(getattr(student, name)).float())
        self.requires_grad_(False)
        self.queues = FeatureQueues(student.config.embed_dim, student.config.queue_size, image_index_queue)

    @torch.no_grad()
    def update(self, student: Albef) -> None:
        """`teacher = m * teacher + (1 - m) * student`, once per optimizer step."""
        ema_update([(getattr(student, n), getattr(self, n)) for n in Albef.TEACHER_PARTS], self.momentum)

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(image tokens [b, 1+P, Hv], image features [b, D], text features [b, D])."""
        pixels = batch["pixels"].to(self.vision_proj.weight.dtype)
        image = self.visual_encoder(pixel_values=pixels).last_hidden_state  # [b, 1+P, Hv]
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [b, L, H]
        image_feat = F.normalize(self.vision_proj(image[:, 0]).float(), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)
        return image, image_feat, text_feat

    @torch.no_grad()
    def mlm_logits(self, batch: dict, image_tokens: Tensor) -> Tensor:
        """[N, V] logits of the masked captions fused with the teacher's own image tokens."""
        enc, ids, mask = self.text_encoder, batch["mlm_input_ids"], batch["attn_mask"]
        return enc.mlm_logits(enc.fuse(enc.text(ids, mask), mask, image_tokens), batch["mlm_index"]).float()


def build_albef(cfg: AlbefConfig) -> Albef:
    """The student, initialised from local BERT / ViT directories when the config names them."""
    model = Albef(cfg)
    if cfg.init_from_bert or cfg.init_from_vit:
        from trainer.models import albef_init

        if cfg.init_from_bert:
            albef_init.load_bert_into_text_encoder(model.text_encoder, cfg.init_from_bert)
        if cfg.init_from_vit:
            albef_init.load_vit_directory(model.visual_encoder, cfg.init_from_vit)
    return model


EMBED_TASK = Albef.embed
"""Retrieval: L2-normalised ITC features and the image tokens / text states fusion needs."""
ITM_SCORE_TASK = Albef.itm_score
"""Retrieval: the ITM match logit of (text, image tokens) pairs."""
