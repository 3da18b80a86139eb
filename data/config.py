"""Typed config of the data section (`data:` in the YAML)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataConfig:
    train: str = "demo_data/train"
    """Directory of the training shards, holding `manifest.json`."""
    val: Optional[str] = None
    """Held-out shard directory (with `manifest.json`) for validation; None skips it."""
    vocab: str = "data/vocab/demo-vocab.txt"
    """Word-piece vocabulary file (one token a line)."""
    micro_batch_size: int = 32
    """Samples per process per micro-step (the global batch is set in `optim`)."""
    val_batch_size: int = 64
    """Samples per process per validation batch."""
    max_txt_len: int = 60
    """Longest caption in word pieces, before [CLS]/[SEP]; longer ones are skipped (UNITER: 60)."""
    shuffle_buffer: int = 512
    """Samples held in each stream's shuffle buffer; 0 or 1 disables shuffling."""
    num_workers: int = 0
    """DataLoader worker processes per task loader (0 = in the training process)."""
    mlm_prob: float = 0.15
    """Probability a word piece is selected for MLM."""
    mrm_prob: float = 0.15
    """Probability a region is masked for MRFR / MRC / MRC-kl (at least one per image)."""
    itm_neg_prob: float = 0.5
    """Probability an ITM pair is made negative by swapping in another image."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "val_batch_size", "max_txt_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")
        for name in ("mlm_prob", "mrm_prob", "itm_neg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
