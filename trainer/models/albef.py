"""ALBEF (DESIGN §4): the student (a ViT image encoder, a BERT split into text layers and fusion
layers that cross-attend to the image tokens, 256-d projections for ITC, ITM and MLM heads,
the learned temperature) and its teacher (EMA copies of the encoders, projections and MLM
head, with the feature queues).

The teacher lives outside the DeepSpeed engine, in fp32 and whole on every rank: its EMA
then never rounds to bf16 (at momentum 0.995 a bf16 copy would stop moving), and ZeRO-3
needs no second partitioned model; the EMA gathers the student's partitioned parameters
(`ema_update`). The trainer (trainer/albef_step.py) runs the teacher on all micro-batches
of a step first, so every micro-batch contrasts against the momentum features of the whole
global batch plus the queue, then hands each micro-batch's `TeacherTargets` to the student.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import masked_gather
from trainer.models.bert import (Attention, Intermediate, Layer, Output, SelfOutput, SelfAttention,
                                 extended_attention_mask, init_bert_weights)
from trainer.models.config import AlbefConfig, ModelConfig
from trainer.models.heads import MlmHead
from trainer.models.momentum import FeatureQueues, ema_update
from trainer.models.uniter import TextEmbeddings
from trainer.objectives import albef as objectives
from trainer.objectives.base import TaskResult

TRAIN_TASK = "albef"
EMBED_TASK = "embed"
"""Retrieval: L2-normalised ITC features and the image tokens / text states fusion needs."""
ITM_SCORE_TASK = "itm_score"
"""Retrieval: the ITM match logit of (text, image tokens) pairs."""


@dataclass
class TeacherTargets:
    """What the teacher gives one micro-batch of the student."""

    image_feat_m: Tensor
    """[B, D] momentum image features of the whole global batch (all ranks, stream order)."""
    text_feat_m: Tensor
    """[B, D]"""
    image_queue: Tensor
    """[D, Q] the queue before this step's push."""
    text_queue: Tensor
    offset: int
    """Row of this micro-batch's first pair in the global batch."""
    mlm_logits_m: Tensor
    """[N, V] the teacher's MLM logits at this micro-batch's masked positions."""
    alpha: float
    """Distillation weight at this step."""
    negatives_seed: int
    """Seeds the hard-negative draw: a function of (seed, step, stream), so it does not depend
    on how streams are spread over ranks."""


@dataclass
class AlbefResult(TaskResult):
    losses: dict[str, Tensor] = field(default_factory=dict)
    """Sums over this micro-batch's terms, with gradient: itc (b rows), itm (3b pairs), mlm (N
    masked tokens); the trainer divides each by its count over the whole step."""


def vision_transformer(cfg: AlbefConfig) -> nn.Module:
    """timm-style pre-LN ViT (LN eps 1e-6, qkv bias, final LN) from `transformers`."""
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              intermediate_size=cfg.vision_mlp, layer_norm_eps=1e-6, qkv_bias=True,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              initializer_range=cfg.initializer_range), add_pooling_layer=False)


class CrossAttention(nn.Module):
    """`crossattention.self` + `.output` (BERT's names): text queries, image keys/values."""

    def __init__(self, cfg: ModelConfig, context_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(cfg, context_width)
        self.output = SelfOutput(cfg)

    def forward(self, hidden: Tensor, image: Tensor) -> Tensor:
        return self.output(self.self(hidden, None, image), hidden)  # [B, L, H]; every image token is valid


class FusionLayer(nn.Module):
    """Self-attention over the text, cross-attention to the image, FFN (post-LN)."""

    def __init__(self, cfg: ModelConfig, context_width: int) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.crossattention = CrossAttention(cfg, context_width)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, hidden: Tensor, mask: Tensor, image: Tensor) -> Tensor:
        attn = self.crossattention(self.attention(hidden, mask), image)  # [B, L, H]
        return self.output(self.intermediate(attn), attn)  # [B, L, H]


class TextEncoder(nn.Module):
    """Embeddings + text layers (unimodal) + fusion layers (with the image) + MLM head."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        bert = cfg.bert()
        self.embeddings = TextEmbeddings(bert)
        self.layer = nn.ModuleList(Layer(bert) for _ in range(cfg.text_layers))
        self.fusion = nn.ModuleList(FusionLayer(bert, cfg.vision_width) for _ in range(cfg.fusion_layers))
        self.cls = MlmHead(cfg.hidden_size, cfg.vocab_size)
        self.apply(lambda m: init_bert_weights(m, cfg.initializer_range))

    def text(self, input_ids: Tensor, attn_mask: Tensor) -> Tensor:
        """[B, L] ids -> unimodal text states [B, L, H]."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)[None]  # [1, L]
        hidden = self.embeddings(input_ids, positions)
        mask = extended_attention_mask(attn_mask, hidden.dtype)  # [B, 1, 1, L]
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden

    def fuse(self, text: Tensor, attn_mask: Tensor, image: Tensor) -> Tensor:
        """text [B, L, H] + image tokens [B, P, Hv] -> multimodal states [B, L, H]."""
        mask = extended_attention_mask(attn_mask, text.dtype)
        for layer in self.fusion:
            text = layer(text, mask, image)
        return text

    def mlm_logits(self, fused: Tensor, mlm_index: Tensor) -> Tensor:
        """Logits [N, V] at the masked positions (flat indices into [B, L])."""
        return self.cls(masked_gather(fused, mlm_index), self.embeddings.word_embeddings.weight)


class Albef(nn.Module):
    """The student. `forward(batch, task, teacher)` dispatches like UNITER's model, so one
    DeepSpeed engine serves training ("albef") and retrieval ("embed", "itm_score")."""

    TEACHER_PARTS = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    """What the teacher copies: all but the temperature and the ITM head (ALBEF)."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual_encoder = vision_transformer(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_encoder = TextEncoder(cfg)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_weights(head, cfg.initializer_range)
        # [1], not ALBEF's 0-d scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))
        register_shared_parameters(self)

    def forward(self, batch: dict, task: str = TRAIN_TASK, teacher: TeacherTargets | None = None):
        if task == TRAIN_TASK:
            if teacher is None:
                raise ValueError("ALBEF training needs the teacher's targets (trainer/albef_step.py)")
            return self.losses(batch, teacher)
        if task == EMBED_TASK:
            return self.embed(batch)
        if task == ITM_SCORE_TASK:
            return self.itm_score(batch)
        raise ValueError(f"unknown ALBEF task {task!r}; known: {TRAIN_TASK}, {EMBED_TASK}, {ITM_SCORE_TASK}")

    def image_tokens(self, pixels: Tensor) -> Tensor:
        dtype = self.vision_proj.weight.dtype  # under bf16/fp16 engines the inputs follow the weights
        return self.visual_encoder(pixel_values=pixels.to(dtype)).last_hidden_state  # [B, 1+P, Hv]

    def losses(self, batch: dict, teacher: TeacherTargets) -> AlbefResult:
        """ITC, hard-negative ITM and distilled MLM of this micro-batch's b pairs."""
        objectives.clamp_temperature_(self.temp)
        image = self.image_tokens(batch["pixels"])  # [b, 1+P, Hv]
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [b, L, H]
        # ITC in fp32: the 65,536-column softmax and the temperature do not belong in bf16.
        image_feat = F.normalize(self.vision_proj(image[:, 0]).float(), dim=-1)  # [b, D]
        text_feat = F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)  # [b, D]
        b, offset = image_feat.size(0), teacher.offset
        itc = objectives.itc_loss(image_feat, text_feat, teacher.image_feat_m, teacher.text_feat_m,
                                  teacher.image_queue, teacher.text_queue, self.temp.float()[0], teacher.alpha, offset)
        generator = torch.Generator(device=image.device).manual_seed(teacher.negatives_seed)
        itm_sum, itm_correct = self.itm(image, text, batch, itc.sim_i2t[:, offset:offset + b],
                                        itc.sim_t2i[:, offset:offset + b], generator)
        losses = {"itc": itc.loss * b, "itm": itm_sum, "mlm": self.distilled_mlm(image, batch, teacher)}
        counts = {"itc": b, "itm": 3 * b, "itm_acc": 3 * b, "mlm": batch["mlm_index"].numel(), "temp": b}
        stats = {**{k: v.detach() for k, v in losses.items()}, "itm_acc": itm_correct,
                 "temp": self.temp.detach().float()[0] * b}
        return AlbefResult(sum(losses.values()), stats,
                           {k: torch.tensor(float(v), device=image.device) for k, v in counts.items()},
                           losses=losses)

    def itm(self, image: Tensor, text: Tensor, batch: dict, sim_i2t: Tensor, sim_t2i: Tensor,
            generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Summed CE and correct count over b positives, b (image, hard negative text) and b
        (hard negative image, text) pairs."""
        mask = batch["attn_mask"]
        neg_text, neg_image = objectives.sample_hard_negatives(sim_i2t, sim_t2i, batch["image_ids"], generator)
        fused = self.text_encoder.fuse(torch.cat([text, text[neg_text], text]),
                                       torch.cat([mask, mask[neg_text], mask]),
                                       torch.cat([image, image, image[neg_image]]))  # [3b, L, H]
        logits = self.itm_head(fused[:, 0]).float()  # [3b, 2]
        labels = objectives.itm_labels(image.size(0), image.device)
        correct = (logits.argmax(-1) == labels).float().sum().detach()
        return F.cross_entropy(logits, labels, reduction="sum"), correct

    def distilled_mlm(self, image: Tensor, batch: dict, teacher: TeacherTargets) -> Tensor:
        """Summed distilled MLM loss over the masked positions (0 when there are none)."""
        ids, mask, index = batch["mlm_input_ids"], batch["attn_mask"], batch["mlm_index"]
        enc = self.text_encoder
        logits = enc.mlm_logits(enc.fuse(enc.text(ids, mask), mask, image), index)  # [N, V]
        if index.numel() == 0:  # a shape known on the host: no sync
            return logits.float().sum() * 0.0
        loss = objectives.distilled_mlm_loss(logits, teacher.mlm_logits_m, batch["mlm_targets"], teacher.alpha)
        return loss * index.numel()

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


def register_shared_parameters(model: Albef) -> None:
    """ZeRO-3: the MLM decoder reads the word embeddings outside their owner module."""
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:  # DeepSpeed is a dependency, but the model is usable without it
        return
    enc = model.text_encoder
    register_external_parameter(enc.cls, enc.embeddings.word_embeddings.weight)


class AlbefTeacher(nn.Module):
    """The momentum model and the queues: fp32, whole on every rank, outside the engine.

    Its parts are EMA copies of the student's TEACHER_PARTS (registered alike, so parameters
    pair up in order); saved in every checkpoint beside the engine's files."""

    def __init__(self, student: Albef) -> None:
        super().__init__()
        self.momentum = student.config.momentum
        for name in Albef.TEACHER_PARTS:
            setattr(self, name, copy.deepcopy(getattr(student, name)).float())
        self.requires_grad_(False)
        self.queues = FeatureQueues(student.config.embed_dim, student.config.queue_size)

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
