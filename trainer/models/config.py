"""Model sections of the run config: UNITER (`arch: uniter`, the default) and ALBEF (`arch: albef`),
described in docs/models.md ("UNITER model", "ALBEF model"). Defaults are the base sizes of each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

# Fields that are counts or dimensions; zero or negative values cannot build a model.
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "img_dim",
    "img_label_dim",
)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and initialisation sources of a UNITER encoder with pretraining heads."""

    arch: Literal["uniter"] = "uniter"
    """Model family: "uniter" (this section) or "albef" (AlbefConfig)."""
    vocab_size: int = 28996
    """Word-piece vocabulary size (28996 = bert-base-cased)."""
    hidden_size: int = 768
    """Width H of every hidden state."""
    num_hidden_layers: int = 12
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer inside each transformer layer."""
    hidden_dropout_prob: float = 0.1
    """Dropout after embeddings and after each attention/FFN output projection."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities."""
    max_position_embeddings: int = 512
    """Rows of the text position table (longest text sequence)."""
    type_vocab_size: int = 2
    """Rows of the token-type table: 0 = text, 1 = image regions."""
    img_dim: int = 2048
    """Dimension of the region features (Faster R-CNN pool5)."""
    img_label_dim: int = 1601
    """Number of detector classes for MRC (Visual Genome 1600 + background)."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear/Embedding weights."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in backward to save activation memory."""
    init_from_bert: Optional[str] = None
    """Local Hugging Face BERT directory (config.json + weights) to initialise the encoder from."""
    init_from_uniter: Optional[str] = None
    """UNITER `model_step_*.pt` state dict file to load after (overriding) `init_from_bert`."""

    def __post_init__(self) -> None:
        if self.arch != "uniter":
            raise ValueError(f"model.arch={self.arch!r}: this is the UNITER section (arch: uniter)")
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); "
                "change one of them (UNITER-base uses 768/12, UNITER-large 1024/16)"
            )
        if self.type_vocab_size < 2:
            raise ValueError(
                f"model.type_vocab_size must be >= 2 (text uses type 0, regions type 1), "
                f"got {self.type_vocab_size}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {value}")
        if self.initializer_range <= 0:
            raise ValueError(f"model.initializer_range must be > 0, got {self.initializer_range}")


_ALBEF_POSITIVE = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "text_layers",
                   "fusion_layers", "max_position_embeddings", "image_size", "patch_size", "vision_width",
                   "vision_layers", "vision_heads", "vision_mlp", "embed_dim", "queue_size", "k_test")


@dataclass(frozen=True)
class AlbefConfig:
    """ALBEF (docs/models.md, "ALBEF model"); defaults are ALBEF-base: ViT-B/16 at 256 px, BERT-base with layers
    6-11 as fusion layers, 256-d contrastive projections, a 65,536-feature queue."""

    arch: Literal["albef"] = "albef"
    vocab_size: int = 30522
    """Word pieces (30522 = bert-base-uncased, ALBEF's text model)."""
    pad_token_id: int = 0
    """[PAD]'s id in the vocabulary (checked against data.tokenizer): its word embedding gets no gradient,
    as in ALBEF (Hugging Face's BertEmbeddings), when a random MLM replacement draws it."""
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6
    """Unimodal text layers (BERT layers 0-5 in ALBEF)."""
    fusion_layers: int = 6
    """Layers that also cross-attend to the image tokens (BERT layers 6-11)."""
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    image_size: int = 256
    """Side of the square input in pixels; must equal data.albef.pixels.image_size."""
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    embed_dim: int = 256
    """Width of the L2-normalised ITC projections."""
    temp: float = 0.07
    """Initial ITC temperature (learned, clamped to [0.001, 0.5])."""
    queue_size: int = 65536
    """Momentum features kept per modality; must be a multiple of the global batch."""
    momentum: float = 0.995
    """EMA factor of the momentum (teacher) model."""
    momentum_update: Literal["optimizer_step"] = "optimizer_step"
    """When the EMA and the queue push happen: once per optimizer step, after all its
    micro-batches used the same teacher and queue (per micro-batch would make the teacher
    depend on how the global batch is split into micro-batches and ranks)."""
    alpha: float = 0.4
    """Distillation weight of the soft targets (ITC) and teacher logits (MLM)."""
    alpha_warmup_steps: Optional[int] = None
    """alpha ramps linearly from 0 over this many optimizer steps; None = the first epoch
    (training samples / global batch), as ALBEF."""
    itm_negatives: Literal["hard", "random"] = "hard"
    """ITM's negative pairs: `hard` draws them by ITC similarity (ALBEF); `random` uniformly among the
    other images' pairs, for from-scratch fusion layers that hard negatives leave at the label prior
    (docs/models.md, "ALBEF ITM in the pixel demo")."""
    k_test: int = 256
    """Retrieval evaluation: ITC top-k candidates re-scored by ITM (ALBEF: 256 on COCO); R@K
    is exact for K <= k_test and a lower bound above it."""
    init_from_bert: Optional[str] = None
    """Local Hugging Face BERT directory: embeddings, text and fusion layers (no cross-attention), MLM head."""
    init_from_vit: Optional[str] = None
    """Local Hugging Face or timm ViT directory for the image encoder (positions interpolated)."""

    def __post_init__(self) -> None:
        if self.arch != "albef":
            raise ValueError(f"model.arch={self.arch!r}: this is the ALBEF section (arch: albef)")
        for name in _ALBEF_POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model.pad_token_id={self.pad_token_id} must be a token id below model.vocab_size")
        for width, heads in (("hidden_size", "num_attention_heads"), ("vision_width", "vision_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"model.{width} ({getattr(self, width)}) must be divisible by model.{heads} "
                                 f"({getattr(self, heads)})")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size ({self.image_size}) must be a multiple of model.patch_size "
                             f"({self.patch_size})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.temp <= 0.5 or not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError("model.temp must be in (0, 0.5], model.momentum in [0, 1), model.alpha in [0, 1]")
        if self.alpha_warmup_steps is not None and self.alpha_warmup_steps < 0:
            raise ValueError(f"model.alpha_warmup_steps must be >= 0, got {self.alpha_warmup_steps}")

    def bert(self) -> ModelConfig:
        """The BERT sizes of the text side, for the shared BERT building blocks."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           num_hidden_layers=self.text_layers + self.fusion_layers,
                           num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                           hidden_dropout_prob=self.hidden_dropout_prob,
                           attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                           max_position_embeddings=self.max_position_embeddings,
                           initializer_range=self.initializer_range)
