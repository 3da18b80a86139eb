"""Typed config of the data section (`data:` in the YAML)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from data.pixels import PixelConfig
from data.limits import DTYPE_MAX, DecodeLimits
from data.packing import check_pack_len

DATASET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class DatasetConfig:
    """One training dataset of a multi-dataset mix (UNITER's `train_datasets`)."""

    name: str
    """Short name used in metric names and RNG streams ("coco", "vg", ...)."""
    train: str
    """Directory of the training shards, holding `manifest.json`."""
    val: Optional[str] = None
    """Held-out shard directory for validation; None skips this dataset's validation."""
    tasks: dict[str, float] = field(default_factory=dict)
    """This dataset's task ratios; empty = the top-level `tasks:`."""
    weight: Optional[float] = None
    """Mix datasets sample by sample instead: give every dataset a weight (e.g. 1, 2, 1) and
    no per-dataset `tasks`; each task's batches then draw each sample's dataset by weight."""

    def __post_init__(self) -> None:
        if not DATASET_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if not self.train:
            raise ValueError(f"train: give the training shard directory of dataset {self.name!r}")
        if self.weight is not None and not self.weight >= 0:
            raise ValueError(f"weight of dataset {self.name!r} must be >= 0, got {self.weight}")
        if self.weight is not None and self.tasks:
            raise ValueError(f"dataset {self.name!r}: give either a sample-mixing weight or per-dataset "
                             f"tasks, not both (weighted datasets share the top-level tasks)")


@dataclass(frozen=True)
class UniterDataConfig:
    """`data.uniter:` what only UNITER's region-feature tasks read."""

    mrm_prob: float = 0.15
    """Probability a region is masked for MRFR / MRC / MRC-kl (at least one per image)."""
    itm_neg_prob: float = 0.5
    """Probability an ITM pair is made negative by swapping in another image."""
    itm_hard_candidates: int = 7
    """For task "itm-hard": negative images drawn per text (distinct image_ids of the same
    micro-batch, fewer if it has fewer); the model scores them and trains on the hardest."""
    token_budget: int = 0
    """> 0: UNITER's token-budget batches (longest row x size <= budget, sizes multiples of 8)
    instead of micro_batch_size samples; 0 = fixed-size batches."""
    pack_len: int = 0
    """> 0: pack several samples into each encoder row of this many positions (a multiple of 8, at
    least data.max_txt_len + 2 + the most regions an image has) with block-diagonal attention, for
    tasks mlm, itm, mrfr, mrc and mrc-kl (docs/data.md, "Packed rows"); 0 = one sample per row."""

    def __post_init__(self) -> None:
        for name in ("mrm_prob", "itm_neg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.uniter.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.itm_hard_candidates < 1:
            raise ValueError(f"data.uniter.itm_hard_candidates must be >= 1, got {self.itm_hard_candidates}")
        if self.token_budget < 0:
            raise ValueError(f"data.uniter.token_budget must be >= 0, got {self.token_budget}")
        check_pack_len(self.pack_len)


@dataclass(frozen=True)
class AlbefDataConfig:
    """`data.albef:` what only ALBEF's picture pipeline reads."""

    pixels: PixelConfig = field(default_factory=PixelConfig)
    """Training augmentation and the evaluation resize."""


@dataclass(frozen=True)
class TokenizerConfig:
    """`data.tokenizer:` which word pieces captions become (docs/data.md, "Tokenizer")."""

    path: str = "data/vocab/demo-vocab.txt"
    """A BERT `vocab.txt` (one word piece a line), or a local Hugging Face tokenizer directory
    (tokenizer.json / vocab.txt + tokenizer_config.json, e.g. one `vlpt vocab train` wrote)."""
    lowercase: Optional[bool] = None
    """Lower-case (and strip accents from) captions before splitting them: true for uncased
    vocabularies (bert-base-uncased, ALBEF), false for cased ones (bert-base-cased, UNITER). Required
    with a vocab.txt, which cannot say; a directory says itself (leave it out, or give the same)."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "demo_data/train"
    """Directory of the training shards, holding `manifest.json` (single-dataset runs)."""
    val: Optional[str] = None
    """Held-out shard directory (with `manifest.json`) for validation; None skips it."""
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Several datasets, each with its own task ratios; when given, `train` and `val` are not used."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(lowercase=False))
    """The word-piece tokenizer (`path`, `lowercase`); default: the demo vocabulary, cased."""
    micro_batch_size: int = 32
    """Samples per process per micro-step (the global batch is set in `optim`)."""
    val_batch_size: int = 64
    """Samples per process per validation batch."""
    max_txt_len: int = 60
    """Longest caption in word pieces, before [CLS]/[SEP]. UNITER skips longer ones (60); ALBEF
    truncates them (23, i.e. 25 tokens with [CLS]/[SEP])."""
    shuffle_buffer: int = 512
    """Samples a reader shuffles together (a block); 0 or 1 disables shuffling."""
    num_workers: int = 0
    """DataLoader worker processes per task loader (0 = in the training process). Each worker
    reads its own part of every epoch, so resume with the same value."""
    resampled: bool = False
    """Draw shards with replacement (deterministic from the seed) instead of cycling through
    every sample once per epoch: for very large or very unequal data."""
    allow_outside_shards: bool = False
    """Let a manifest list shards outside its own folder (absolute paths, `..`, symlinks leading
    out, file:// URLs) or, on S3, outside its bucket and prefix. Off: such a manifest is refused
    with a one-line error, since a manifest is data and must not steer reads elsewhere."""
    verify_sha256: bool = False
    """Check each shard's sha256 against its manifest before reading it (once per reader); a
    mismatching shard is skipped and counted as "sha256_mismatch". Costs one extra full read."""
    mlm_prob: float = 0.15
    """Probability a word piece is selected for MLM."""
    uniter: UniterDataConfig = field(default_factory=UniterDataConfig)
    albef: AlbefDataConfig = field(default_factory=AlbefDataConfig)
    max_bad_per_1000: float = 10.0
    """Abort (one-line error, exit 2) when more than this many per 1,000 training samples
    read so far, over all ranks, were skipped as bad (any reason, corrupt shards included)."""
    min_samples_for_bad_rate: int = 1000
    """The bad-sample limit is checked only once this many samples were read in total."""
    max_image_pixels: int = DecodeLimits.max_image_pixels
    """Skip a picture whose header declares more pixels (width x height) than this, before
    decoding it: a few KB of PNG can declare 12000 x 12000. Counted as "image_too_large"."""
    max_member_bytes: int = DecodeLimits.max_member_bytes
    """Largest shard member, in bytes: a bigger one is skipped unread, and so is an npz whose arrays
    would inflate beyond it ("npz_too_large"). The 256 MiB default is far above a UNITER npz (100
    regions: under 1 MB) or a photo, and bounds what one bad sample can cost."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "val_batch_size", "max_txt_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")
        names = [d.name for d in self.datasets]
        weighted = [d.weight is not None for d in self.datasets]
        if any(weighted) and not all(weighted):
            raise ValueError("datasets: give every dataset a weight (sample mixing) or none (task mixing)")
        if any(weighted) and not sum(d.weight for d in self.datasets) > 0:
            raise ValueError("datasets: the weights must not all be 0")
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique, got {names}")
        if not self.max_bad_per_1000 >= 0:  # also rejects NaN
            raise ValueError(f"data.max_bad_per_1000 must be >= 0, got {self.max_bad_per_1000}")
        if self.min_samples_for_bad_rate < 0:
            raise ValueError(f"data.min_samples_for_bad_rate must be >= 0, got {self.min_samples_for_bad_rate}")
        for name in ("max_image_pixels", "max_member_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.mlm_prob <= 1.0:
            raise ValueError(f"data.mlm_prob must be in [0, 1], got {self.mlm_prob}")

    def decode_limits(self, dtype: str = "fp32") -> DecodeLimits:
        """The per-sample decoding budgets, for a run in precision `dtype` (precision.dtype)."""
        return DecodeLimits(self.max_image_pixels, self.max_member_bytes, DTYPE_MAX[dtype])

    @property
    def sample_mixing(self) -> bool:
        """Datasets mixed sample by sample (weights given) rather than step by step."""
        return bool(self.datasets) and all(d.weight is not None for d in self.datasets)
