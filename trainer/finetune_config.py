"""The `finetune:` section (docs/downstream.md): what a `stage: finetune` run reads and which head it
trains. The task itself is the one entry of `tasks:` (vqa, ve, retrieval, nlvr2, re, vcr)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class FinetuneConfig:
    train: Optional[str] = None
    """Task folder of the training split (`vlpt tasks ...`, `vlpt demo-data --tasks`)."""
    val: Optional[str] = None
    """Task folder of the held-out split: validated every train.val_every steps and at the end;
    `vlpt evaluate` scores it and writes its predictions file."""
    features: tuple[str, ...] = ()
    """Region shard folders (vlpt-regions-v1) holding the features of every image the examples name."""
    init_from: Optional[str] = None
    """Pretrained weights: a vlpt run folder, its checkpoints/ folder or one step_XXXXXXXX/ folder, or a
    state-dict file (ours, or UNITER's `model_step_*.pt`); loaded by the rules of docs/downstream.md."""
    nlvr2_variant: Literal["paired", "triplet", "paired-attn"] = "paired-attn"
    re_mlp: Literal[1, 2] = 1
    """RE head: 1 = Linear(H, 1) (RefCOCO, RefCOCOg), 2 = Linear -> GELU -> LN -> Linear (RefCOCO+)."""
    re_loss: Literal["cls", "rank"] = "cls"
    negative_size: int = 1
    """Retrieval K: each caption's group holds K negative images and K negative captions (G = 1 + 2K),
    drawn from the micro-batch's other images."""
    hard_negatives: int = 0
    """Retrieval with hard negatives (UNITER's hard-negative fine-tuning: 31): per caption, score
    `hard_candidates` random other images and as many captions of other images of the training split, then
    train the hinge on the positive and this many highest-scoring of each side. 0: random negatives."""
    hard_candidates: int = 399
    """Candidates per caption and side for `hard_negatives` (UNITER: 399)."""
    lr_mul: float = 1.0
    """The task head's learning rate is optim.lr x lr_mul (UNITER VQA: 10)."""
    retrieval_eval: Literal["full", "validation"] = "full"
    """How validations score retrieval: every caption against every image, or UNITER's validation style (each
    caption's own image and the next `retrieval_eval_images` - 1 of the list, image R@K only). `vlpt evaluate`
    always scores the full matrix."""
    retrieval_eval_images: int = 100
    """Images per caption of the validation style (UNITER's inf_minibatch_size)."""
    eval_batch_size: int = 64
    """Examples (retrieval: caption-image pairs) per scoring batch."""
    cache_images: int = 4096
    """Decoded images each rank keeps in memory."""
    vcr_extra_words: int = 81
    """VCR: word rows appended to the vocabulary (UNITER's object-tag tokens)."""
    gradcam_layer: int = 2
    """ALBEF grounding: the fusion layer whose cross-attention gives the Grad-CAM (ALBEF's block 8 of BERT-base:
    fusion layer 2)."""

    def __post_init__(self) -> None:
        if min(self.negative_size, self.eval_batch_size, self.cache_images, self.retrieval_eval_images) < 1:
            raise ValueError("finetune.negative_size, eval_batch_size, cache_images and retrieval_eval_images must "
                             "be >= 1")
        if self.hard_negatives < 0 or (self.hard_negatives and not self.hard_negatives <= self.hard_candidates):
            raise ValueError(f"finetune.hard_negatives={self.hard_negatives} must be 0 (random negatives) or between 1 "
                             f"and finetune.hard_candidates={self.hard_candidates}")
        if self.lr_mul <= 0:
            raise ValueError(f"finetune.lr_mul must be > 0, got {self.lr_mul}")
        if self.vcr_extra_words < 0:
            raise ValueError(f"finetune.vcr_extra_words must be >= 0, got {self.vcr_extra_words}")
