"""ALBEF (DESIGN §4): a ViT image encoder, a BERT split into text layers and fusion layers
that cross-attend to the image tokens, 256-d projections for ITC, ITM and MLM heads, and
the momentum teacher (EMA copies of the encoders, projections and MLM head) with its queues.

`forward` computes the three losses of one micro-batch; the trainer updates the teacher
(`update_momentum`) before the micro-batches of a step and pushes the step's momentum
features (`queues.push`) after them, once per optimizer step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import masked_gather
from trainer.distributed import all_gather_rows
from trainer.models.bert import (Attention, Intermediate, Layer, Output, SelfOutput, SelfAttention,
                                 extended_attention_mask, init_bert_weights)
from trainer.models.config import ModelConfig
from trainer.models.heads import MlmHead
from trainer.models.momentum import FeatureQueues, ema_update
from trainer.models.uniter import TextEmbeddings
from trainer.objectives import albef as objectives
from trainer.objectives.base import TaskResult


@dataclass
class AlbefResult(TaskResult):
    momentum_features: tuple[Tensor, Tensor] = ()
    """This micro-batch's (image [b, D], text [b, D]) momentum features, for the queue push
    the trainer makes once per optimizer step."""


@dataclass(frozen=True)
class AlbefConfig:
    """ALBEF-base by default: ViT-B/16 at 256 px, BERT-base with layers 6-11 as fusion."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6
    fusion_layers: int = 6
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995

    def bert(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           num_hidden_layers=self.text_layers + self.fusion_layers,
                           num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                           hidden_dropout_prob=self.hidden_dropout_prob,
                           attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                           max_position_embeddings=self.max_position_embeddings,
                           initializer_range=self.initializer_range)


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
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # The teacher: copies of everything but the temperature and the ITM head, never trained.
        self.momentum = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in self.MOMENTUM})
        self.momentum.requires_grad_(False)
        self.queues = FeatureQueues(cfg.embed_dim, cfg.queue_size)

    MOMENTUM = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    @torch.no_grad()
    def update_momentum(self) -> None:
        ema_update([(getattr(self, n), self.momentum[n]) for n in self.MOMENTUM], self.config.momentum)

    def image_tokens(self, pixels: Tensor, momentum: bool = False) -> Tensor:
        vit = self.momentum["visual_encoder"] if momentum else self.visual_encoder
        return vit(pixel_values=pixels).last_hidden_state  # [B, 1+P, Hv]

    def forward(self, batch: dict, alpha: float, offset: int = 0) -> AlbefResult:
        """Losses of this rank's b pairs; `offset`: its first row in the global batch.

        batch: pixels [b, 3, S, S], input_ids / attn_mask [b, L] (caption), mlm_input_ids [b, L],
        mlm_index [N] (flat positions), mlm_targets [N], image_ids [b].
        """
        objectives.clamp_temperature_(self.temp)
        image = self.image_tokens(batch["pixels"])  # [b, 1+P, Hv]
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [b, L, H]
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)  # [b, D]
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # [b, D]
        with torch.no_grad():
            image_m = self.image_tokens(batch["pixels"], momentum=True)  # [b, 1+P, Hv]
            text_m = self.momentum["text_encoder"].text(batch["input_ids"], batch["attn_mask"])
            image_feat_m = F.normalize(self.momentum["vision_proj"](image_m[:, 0]), dim=-1)  # [b, D]
            text_feat_m = F.normalize(self.momentum["text_proj"](text_m[:, 0]), dim=-1)  # [b, D]
        itc = objectives.itc_loss(image_feat, text_feat, all_gather_rows(image_feat_m), all_gather_rows(text_feat_m),
                                  self.queues.image_queue, self.queues.text_queue, self.temp, alpha, offset)
        b = image_feat.size(0)
        itm_loss, itm_acc = self.itm(image, text, batch, itc.sim_i2t[:, offset:offset + b],
                                     itc.sim_t2i[:, offset:offset + b])
        mlm_loss = self.distilled_mlm(image, image_m, batch, alpha)
        loss = itc.loss + itm_loss + mlm_loss
        stats = {"loss": loss.detach() * b, "itc": itc.loss.detach() * b, "itm": itm_loss.detach() * b,
                 "mlm": mlm_loss.detach() * b, "itm_acc": itm_acc * b}
        return AlbefResult(loss * b, stats, momentum_features=(image_feat_m, text_feat_m))

    def itm(self, image: Tensor, text: Tensor, batch: dict, sim_i2t: Tensor, sim_t2i: Tensor):
        """CE over b positives, b (image, hard negative text), b (hard negative image, text)."""
        mask = batch["attn_mask"]
        neg_text, neg_image = objectives.sample_hard_negatives(sim_i2t, sim_t2i, batch["image_ids"])
        fused = self.text_encoder.fuse(torch.cat([text, text[neg_text], text]),
                                       torch.cat([mask, mask[neg_text], mask]),
                                       torch.cat([image, image, image[neg_image]]))  # [3b, L, H]
        logits = self.itm_head(fused[:, 0]).float()  # [3b, 2]
        labels = objectives.itm_labels(image.size(0), image.device)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean().detach()

    def distilled_mlm(self, image: Tensor, image_m: Tensor, batch: dict, alpha: float) -> Tensor:
        ids, mask, index = batch["mlm_input_ids"], batch["attn_mask"], batch["mlm_index"]
        enc = self.text_encoder
        logits = enc.mlm_logits(enc.fuse(enc.text(ids, mask), mask, image), index)  # [N, V]
        with torch.no_grad():
            teacher = self.momentum["text_encoder"]
            logits_m = teacher.mlm_logits(teacher.fuse(teacher.text(ids, mask), mask, image_m), index)
        return objectives.distilled_mlm_loss(logits, logits_m, batch["mlm_targets"], alpha)
