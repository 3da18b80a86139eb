"""Model section of the run config (DESIGN §2). Defaults are UNITER-base."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    arch: str = "uniter"
    """Model family; `build_model` builds "uniter"."""
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
