"""Post-LayerNorm BERT encoder layers (docs/models.md, "UNITER model").

Our own implementation; module attribute names reproduce Hugging Face BERT's
state-dict keys (`layer.{i}.attention.self.query`, ...) so that BERT and UNITER
checkpoints load without renaming.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.models.config import ModelConfig

LN_EPS = 1e-12
# BERT/UNITER's additive key mask; not finfo.min, which overflows to -inf/NaN
# when added to scores in fp16.
MASK_VALUE = -10000.0


def extended_attention_mask(attn_masks: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a [B, L] 1 (valid) / 0 (pad) mask into the additive key mask [B, 1, 1, L]."""
    m = attn_masks[:, None, None, :].to(dtype)  # [B, 1, 1, L]
    return (1.0 - m) * MASK_VALUE


def causal_attention_mask(attn_masks: Tensor, dtype: torch.dtype) -> Tensor:
    """A decoder's additive mask [B, 1, L, L]: position i attends to valid positions j <= i (BERT's
    `is_decoder` mask: causal x key padding)."""
    length = attn_masks.size(1)
    causal = torch.ones(length, length, device=attn_masks.device).tril()  # [L, L]
    m = causal[None, None] * attn_masks[:, None, None, :].to(causal.dtype)  # [B, 1, L, L]
    return (1.0 - m.to(dtype)) * MASK_VALUE


def block_diagonal_mask(segment_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [R, 1, Lp, Lp] of packed rows: a position attends only to positions of its own
    sample (same segment id). Pads (-1) attend to the row's pads, so no query row is empty; with
    the additive MASK_VALUE an empty row would not be NaN either, only meaningless."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [R, 1, Lp, Lp]
    return (1.0 - same.to(dtype)) * MASK_VALUE


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT/UNITER init: Linear/Embedding ~ N(0, std), an Embedding's padding row 0 (as Hugging Face's
    BERT), Linear bias 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with an additive key mask: over `hidden`
    itself, or (cross-attention, `context_width` given) from `hidden` to a `context`."""

    def __init__(self, cfg: ModelConfig, context_width: Optional[int] = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(context_width or h, h)
        self.value = nn.Linear(context_width or h, h)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, L, d]

    def forward(self, hidden: Tensor, mask: Optional[Tensor], context: Optional[Tensor] = None) -> Tensor:
        """hidden [B, L, H], additive mask [B, 1, 1, S] (keys), [B, 1, L, S] (packed rows'
        block-diagonal) or None, context [B, S, C] (default: hidden) -> [B, L, H]."""
        source = hidden if context is None else context
        q = self._heads(self.query(hidden))  # [B, nh, L, d]
        k = self._heads(self.key(source))  # [B, nh, S, d]
        v = self._heads(self.value(source))  # [B, nh, S, d]
        # SDPA matches the explicit softmax(q k^T / sqrt(d) + mask) v within 1e-6
        # in fp32 (tests/unit/test_uniter_model.py checks it) and its fused kernels
        # accumulate the softmax in fp32, which keeps bf16/fp16 safe. The mask
        # must be in the scores' dtype (autocast may have made q low precision).
        ctx = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if mask is None else mask.to(q.dtype),
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # [B, nh, L, d]
        b, _, l, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)  # [B, L, H]

    def forward_with_probs(self, hidden: Tensor, mask: Optional[Tensor],
                           context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """`forward` computed explicitly (no dropout), also returning the attention probabilities [B, nh, L, S]
        in the graph: Grad-CAM (trainer/grounding.py) differentiates with respect to them."""
        source = hidden if context is None else context
        q = self._heads(self.query(hidden))  # [B, nh, L, d]
        k = self._heads(self.key(source))  # [B, nh, S, d]
        v = self._heads(self.value(source))  # [B, nh, S, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, nh, L, S]
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        probs = scores.softmax(-1)
        ctx = probs @ v  # [B, nh, L, d]
        b, _, l, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim), probs


class SelfOutput(nn.Module):
    """Attention output projection, dropout, residual, post-LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)  # [B, L, H]


class Attention(nn.Module):
    """`attention.self` + `attention.output`, named as in BERT."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(hidden, mask), hidden)  # [B, L, H]


class Intermediate(nn.Module):
    """FFN up-projection with exact (erf) GELU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden))  # [B, L, FFN]


class Output(nn.Module):
    """FFN down-projection, dropout, residual, post-LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)  # [B, L, H]


class Layer(nn.Module):
    """One post-LN transformer layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        attn = self.attention(hidden, mask)  # [B, L, H]
        return self.output(self.intermediate(attn), attn)  # [B, L, H]


class Encoder(nn.Module):
    """Stack of layers; optional per-layer activation checkpointing while training."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, hidden: Tensor, attn_masks: Optional[Tensor], segment_ids: Optional[Tensor] = None) -> Tensor:
        """hidden [B, L, H], attn_masks [B, L] (1 valid, 0 pad) -> [B, L, H]; or packed rows
        hidden [R, Lp, H] with segment_ids [R, Lp] (sample per position, -1 pad; attn_masks
        unused) -> [R, Lp, H], attending within each sample only."""
        if segment_ids is None:
            mask = extended_attention_mask(attn_masks, hidden.dtype)  # [B, 1, 1, L]
        else:
            mask = block_diagonal_mask(segment_ids, hidden.dtype)  # [R, 1, Lp, Lp]
        for layer in self.layer:
            if self.activation_checkpointing and self.training:
                # Non-reentrant: works with inputs that do not require grad and
                # restores the RNG state so dropout masks match on recompute.
                hidden = checkpoint(layer, hidden, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask)
        return hidden
