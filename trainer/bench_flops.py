"""Model FLOPs of one training micro-batch, for `vlpt bench train`'s MFU (docs/benchmarks.md, "MFU").

Useful work only: the matmul FLOPs of the transformer layers over the real tokens and regions of
each sample (attention-mask ones), never over padding. Per sample of l real tokens, a stack of n
layers of width H and FFN width I runs forward

    2 * P * l + 4 * n * l^2 * H,   P = n * (4 H^2 + 2 H I)  (its linear weights)

(QKV + output projections and the FFN: 2 FLOPs per weight per token; QK^T and AV: 2 l^2 H each
per layer), and forward + backward = 3 x forward. The padded figure is the same at the padded
length, what the dense [B, L] layout makes the device compute. Embeddings and heads (a few
masked-token decoders, the ITM/ITC projections) are left out: a few percent at base sizes, so
MFU errs low.

Packed UNITER batches (data/packing.py: several samples per row, `segment_ids` [R, Lp]) attend
block-diagonally, so each segment counts on its own (its l^2, not the row's); their padded figure
is that of the packed rows, R x Lp, the layout the encoder runs on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Dense bf16/fp16 tensor-core peak per GPU (vendor data sheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

FWD_BWD = 3
"""Backward costs twice the forward's matmuls (gradients of activations and of weights)."""


@dataclass(frozen=True)
class BatchWork:
    """What one micro-batch makes the model compute in a training step."""

    samples: int
    tokens: int
    """Real tokens + regions (image tokens) the model reads."""
    padded_tokens: int
    flops: float
    """Useful model FLOPs: real tokens only."""
    padded_flops: float
    """The same at the padded layout (what the device is asked to do)."""

    def __add__(self, other: "BatchWork") -> "BatchWork":
        return BatchWork(self.samples + other.samples, self.tokens + other.tokens,
                         self.padded_tokens + other.padded_tokens, self.flops + other.flops,
                         self.padded_flops + other.padded_flops)


NO_WORK = BatchWork(0, 0, 0, 0.0, 0.0)


@dataclass(frozen=True)
class Lengths:
    """Moments of the sequence lengths of n sequences: all a stack's FLOPs depend on."""

    n: int
    s1: int
    """sum of l"""
    s2: int
    """sum of l^2"""

    @classmethod
    def of(cls, lengths: Tensor) -> "Lengths":
        l = lengths.detach().to("cpu", torch.int64).reshape(-1)  # [n]
        return cls(int(l.numel()), int(l.sum()), int((l * l).sum()))

    @classmethod
    def fixed(cls, n: int, length: int) -> "Lengths":
        return cls(n, n * length, n * length * length)


def layer_weights(layers: int, hidden: int, ffn: int) -> int:
    """Linear weights of `layers` BERT/ViT layers: QKV + output (4 H^2) and the FFN (2 H I)."""
    return layers * (4 * hidden * hidden + 2 * hidden * ffn)


def stack_forward(lengths: Lengths, layers: int, hidden: int, ffn: int) -> float:
    """Forward FLOPs of a self-attention stack over sequences with these lengths."""
    return float(2 * layer_weights(layers, hidden, ffn) * lengths.s1 + 4 * layers * hidden * lengths.s2)


def fusion_forward(text: Lengths, image_tokens: int, layers: int, hidden: int, ffn: int, image_width: int) -> float:
    """Forward FLOPs of ALBEF's fusion layers over text of these lengths, each row cross-attending to
    `image_tokens` image tokens: the self-attention layer, plus the cross-attention's Q and output
    (2 H^2 per text token), its K and V of every image token (2 Hv H each) and its scores (4 l T H)."""
    self_part = stack_forward(text, layers, hidden, ffn)
    cross_q_out = 2 * (2 * hidden * hidden) * text.s1
    cross_kv = 2 * (2 * image_width * hidden) * image_tokens * text.n
    cross_scores = 4 * hidden * image_tokens * text.s1
    return self_part + float(layers * (cross_q_out + cross_kv + cross_scores))


def segment_lengths(segment_ids: Tensor) -> Tensor:
    """Lengths [S] of the samples packed into rows (data/packing.py: the sample's id on each of
    its slots, -1 at pads)."""
    seg = segment_ids.detach().to("cpu", torch.int64).reshape(-1)  # [R * Lp]
    return torch.unique(seg[seg >= 0], return_counts=True)[1]  # [S]


def uniter_work(batch: dict, model) -> BatchWork:
    """UNITER's encoder (model: ModelConfig) over text + regions: per sample its attention-mask ones
    (`attn_masks` [B, L]); packed (`segment_ids` [R, Lp]), per segment, the rows the encoder runs on
    being the packed ones."""
    if "segment_ids" in batch:
        per_sample = segment_lengths(batch["segment_ids"])  # [S]
        rows, length = batch["segment_ids"].shape
    else:
        per_sample = batch["attn_masks"].sum(1)  # [B]
        rows, length = batch["attn_masks"].shape
    real = Lengths.of(per_sample)
    dims = (model.num_hidden_layers, model.hidden_size, model.intermediate_size)
    return BatchWork(real.n, real.s1, rows * length, FWD_BWD * stack_forward(real, *dims),
                     FWD_BWD * stack_forward(Lengths.fixed(rows, length), *dims))


def image_token_count(model) -> int:
    """ViT tokens per image: the patches plus [CLS]."""
    return (model.image_size // model.patch_size) ** 2 + 1


def albef_pass_flops(text: Lengths, model, mlm: bool = True) -> tuple[float, float]:
    """(student forward + backward, teacher forward) of one ALBEF step over pairs with these caption lengths.

    Student (trainer/recipes/albef_tasks.py `albef_losses`): the ViT once; the text layers twice
    (captions for ITC/ITM, masked captions for MLM); the fusion 4 times: 3 ITM rows per pair
    (positive, hard-negative text, hard-negative image) and the MLM pass. The hard-negative text rows
    are counted at the pairs' own lengths: the draw happens on the device and is not read back, and
    under a uniform draw its expected sums are these. Teacher (trainer/models/albef.py
    `AlbefTeacher.encode` + `mlm_logits`, no backward): the ViT, the text layers twice, the fusion once.
    Without MLM (retrieval fine-tuning, `mlm=False`), the masked-caption passes are not run: the student's
    text layers once and fusion 3 times, the teacher's ViT and text layers once.
    """
    m = model
    vision = stack_forward(Lengths.fixed(text.n, image_token_count(m)), m.vision_layers, m.vision_width, m.vision_mlp)
    txt = stack_forward(text, m.text_layers, m.hidden_size, m.intermediate_size)
    fusion = fusion_forward(text, image_token_count(m), m.fusion_layers, m.hidden_size, m.intermediate_size,
                            m.vision_width)
    if not mlm:
        return FWD_BWD * (vision + txt + 3 * fusion), vision + txt
    return FWD_BWD * (vision + 2 * txt + 4 * fusion), vision + 2 * txt + fusion


def albef_classifier_work(batch: dict, model, images: int = 1, pictures: Optional[int] = None,
                          teacher: bool = True) -> BatchWork:
    """ALBEF's classification models (trainer/models/albef_classifier.py): per example `pictures` ViT passes
    (default `images`: 1 VE, 2 NLVR2; text assignment: 1, its pictures reused as partners), one text pass and
    `images` x fusion_layers fusion layers, each reading one picture; forward + backward for the student and,
    with a `teacher`, forward for its momentum copy."""
    mask = batch["attn_mask"]  # [B, L]
    b, length = mask.shape
    image, pictures = image_token_count(model), images if pictures is None else pictures

    def one_pass(text: Lengths) -> float:
        m = model
        vision = pictures * stack_forward(Lengths.fixed(text.n, image), m.vision_layers, m.vision_width, m.vision_mlp)
        return vision + stack_forward(text, m.text_layers, m.hidden_size, m.intermediate_size) + fusion_forward(
            text, image, images * m.fusion_layers, m.hidden_size, m.intermediate_size, m.vision_width)

    passes = FWD_BWD + (1 if teacher else 0)
    useful = passes * one_pass(Lengths.of(mask.sum(1)))
    padded = passes * one_pass(Lengths.fixed(b, length))
    return BatchWork(b, int(mask.sum()) + b * pictures * image, b * (length + pictures * image), useful, padded)


def albef_vqa_work(batch: dict, model) -> BatchWork:
    """ALBEF's VQA model (trainer/models/albef_vqa.py): per question one ViT, text and fusion pass; per answer
    the decoder's fusion_layers layers over its tokens, cross-attending to its question's (padded) tokens, and
    the vocabulary projection of every answer token; forward + backward and the momentum copy's forward."""
    mask, answers = batch["attn_mask"], batch["answer_mask"]  # [B, Lq], [N, La]
    (b, length), (n, answer_length) = mask.shape, answers.shape
    image, m = image_token_count(model), model

    def one_pass(question: Lengths, answer: Lengths) -> float:
        vision = stack_forward(Lengths.fixed(question.n, image), m.vision_layers, m.vision_width, m.vision_mlp)
        encoder = stack_forward(question, m.text_layers, m.hidden_size, m.intermediate_size) + fusion_forward(
            question, image, m.fusion_layers, m.hidden_size, m.intermediate_size, m.vision_width)
        decoder = fusion_forward(answer, length, m.fusion_layers, m.hidden_size, m.intermediate_size, m.hidden_size)
        return vision + encoder + decoder + 2 * m.hidden_size * m.vocab_size * answer.s1

    useful = (FWD_BWD + 1) * one_pass(Lengths.of(mask.sum(1)), Lengths.of(answers.sum(1)))
    padded = (FWD_BWD + 1) * one_pass(Lengths.fixed(b, length), Lengths.fixed(n, answer_length))
    return BatchWork(b, int(mask.sum()) + b * image + int(answers.sum()), b * (length + image) + n * answer_length,
                     useful, padded)


def albef_work(batch: dict, model, mlm: bool = True) -> BatchWork:
    """ALBEF (model: AlbefConfig): the student's forward + backward and the momentum teacher's forward,
    both required by the algorithm, so both count as useful work."""
    mask = batch["attn_mask"]  # [B, L]
    b, length = mask.shape
    image = image_token_count(model)
    useful = sum(albef_pass_flops(Lengths.of(mask.sum(1)), model, mlm))
    padded = sum(albef_pass_flops(Lengths.fixed(b, length), model, mlm))
    return BatchWork(b, int(mask.sum()) + b * image, b * (length + image), useful, padded)
