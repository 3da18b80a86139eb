"""UNITER pretraining heads (docs/models.md, "UNITER model"), named as UNITER's checkpoint keys.

The MLM decoder and the MRFR output layer are tied to backbone weights
(`word_embeddings.weight`, `img_linear.weight`). The tied weight is passed in at
call time instead of being stored on the head: there is one Parameter (one
gradient, one optimizer state), no duplicate state-dict keys, and under ZeRO-3
the weight is gathered on access like any GPT-style tied embedding rather than
being a second partitioned copy that silently drifts apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.bert import LN_EPS


def _transform(hidden: int) -> nn.Sequential:
    """`Linear(H, H) -> GELU -> LN`; indices 0 and 2 carry the weights (`net.0`, `net.2`)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LN_EPS))


class MlmTransform(nn.Module):
    """BERT's `predictions.transform`: dense -> GELU -> LayerNorm."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))  # [N, H]


class MlmPredictions(nn.Module):
    """Transform, then decode with the (tied) word-embedding matrix and an own bias."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = MlmTransform(hidden)

    def forward(self, h: Tensor, decoder_weight: Tensor) -> Tensor:
        """h [N, H], decoder_weight [V, H] -> logits [N, V]."""
        return F.linear(self.transform(h), decoder_weight, self.bias)


class MlmHead(nn.Module):
    """Wrapper that yields BERT's `cls.predictions.*` key names."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.predictions = MlmPredictions(hidden, vocab_size)

    def forward(self, h: Tensor, decoder_weight: Tensor) -> Tensor:
        return self.predictions(h, decoder_weight)  # [N, V]


class RegionFeatureRegression(nn.Module):
    """MRFR: transform, then project back to feature space with `img_linear.weight^T`."""

    def __init__(self, hidden: int, img_dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(img_dim))
        self.net = _transform(hidden)

    def forward(self, h: Tensor, img_linear_weight: Tensor) -> Tensor:
        """h [N, H], img_linear_weight [H, img_dim] -> features [N, img_dim]."""
        return F.linear(self.net(h), img_linear_weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC: `Linear(H, H) -> GELU -> LN -> Linear(H, img_label_dim)`."""

    def __init__(self, hidden: int, label_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*_transform(hidden), nn.Linear(hidden, label_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)  # [N, img_label_dim]

