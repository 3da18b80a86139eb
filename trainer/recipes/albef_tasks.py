"""What ALBEF's training runs inside the engine's forward: the student's encoders and heads,
then ITC, hard-negative ITM and distilled MLM (trainer/objectives/albef.py) on this micro-batch,
against the targets the teacher computed for the whole step (`TeacherTargets`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.objectives import albef as objectives
from trainer.objectives.base import TaskResult

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def teacher_precision(device: torch.device, dtype: str):
    """The teacher keeps fp32 weights; under a bf16/fp16 run it computes in that dtype."""
    if dtype not in _AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[dtype])


def negatives_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.default_rng([seed, step, stream, 4]).integers(2 ** 62))


def albef_losses(model, batch: dict, teacher: TeacherTargets) -> TaskResult:
    """ITC, hard-negative ITM and distilled MLM of this micro-batch's b pairs: sums over their terms
    (b rows, 3b pairs, the masked tokens), which the step divides by their counts over the step."""
    objectives.clamp_temperature_(model.temp)
    image, text, image_feat, text_feat = student_features(model, batch)
    b, offset = image_feat.size(0), teacher.offset
    itc = objectives.itc_loss(image_feat, text_feat, teacher.image_feat_m, teacher.text_feat_m,
                              teacher.image_queue, teacher.text_queue, model.temp.float()[0], teacher.alpha, offset)
    generator = torch.Generator(device=image.device).manual_seed(teacher.negatives_seed)
    itm_sum, itm_correct = hard_negative_itm(model, image, text, batch, itc.sim_i2t[:, offset:offset + b],
                                             itc.sim_t2i[:, offset:offset + b], generator)
    losses = {"itc": itc.loss * b, "itm": itm_sum, "mlm": distilled_mlm(model, image, batch, teacher)}
    return task_result(model, b, losses, itm_correct, {"mlm": batch["mlm_index"].numel()})


def student_features(model, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(image tokens [b, 1+P, Hv], text states [b, L, H], ITC image and text features [b, D], fp32)."""
    image = model.image_tokens(batch["pixels"])  # [b, 1+P, Hv]
    text = model.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [b, L, H]
    # ITC in fp32: the 65,536-column softmax and the temperature do not belong in bf16.
    image_feat = F.normalize(model.vision_proj(image[:, 0]).float(), dim=-1)  # [b, D]
    text_feat = F.normalize(model.text_proj(text[:, 0]).float(), dim=-1)  # [b, D]
    return image, text, image_feat, text_feat


def task_result(model, b: int, losses: dict[str, Tensor], itm_correct: Tensor, counts: dict[str, int]) -> TaskResult:
    """`losses` (sums: ITC over b rows, ITM over 3b pairs, the others over `counts`) with the ITM accuracy
    and the temperature as statistics."""
    counts = {"itc": b, "itm": 3 * b, "itm_acc": 3 * b, "temp": b, **counts}
    stats = {**{k: v.detach() for k, v in losses.items()}, "itm_acc": itm_correct,
             "temp": model.temp.detach().float()[0] * b}
    device = itm_correct.device
    # torch.full fills on the device; torch.tensor(v, device=...) would copy from the host and wait
    return TaskResult(losses, stats, {k: torch.full((), float(v), device=device) for k, v in counts.items()})


def hard_negative_itm(model, image: Tensor, text: Tensor, batch: dict, sim_i2t: Tensor, sim_t2i: Tensor,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Summed CE and correct count over b positives, b (image, negative text) and b (negative image, text)
    pairs; negatives drawn by ITC similarity, or uniformly with `model.itm_negatives: random`."""
    mask = batch["attn_mask"]
    neg_text, neg_image = objectives.sample_hard_negatives(sim_i2t, sim_t2i, batch["image_ids"], generator,
                                                           hard=model.config.itm_negatives == "hard")
    fused = model.text_encoder.fuse(torch.cat([text, text[neg_text], text]),
                                    torch.cat([mask, mask[neg_text], mask]),
                                    torch.cat([image, image, image[neg_image]]))  # [3b, L, H]
    logits = model.itm_head(fused[:, 0]).float()  # [3b, 2]
    labels = objectives.itm_labels(image.size(0), image.device)
    correct = (logits.argmax(-1) == labels).float().sum().detach()
    return F.cross_entropy(logits, labels, reduction="sum"), correct


def distilled_mlm(model, image: Tensor, batch: dict, teacher: TeacherTargets) -> Tensor:
    """Summed distilled MLM loss over the masked positions (0 when there are none)."""
    ids, mask, index = batch["mlm_input_ids"], batch["attn_mask"], batch["mlm_index"]
    enc = model.text_encoder
    logits = enc.mlm_logits(enc.fuse(enc.text(ids, mask), mask, image), index)  # [N, V]
    if index.numel() == 0:  # a shape known on the host: no sync
        return logits.float().sum() * 0.0
    loss = objectives.distilled_mlm_loss(logits, teacher.mlm_logits_m, batch["mlm_targets"], teacher.alpha)
    return loss * index.numel()


RETRIEVAL_WEIGHT_SHIFT = 1e-4
"""ALBEF's retrieval adds 1e-4 to the similarities before the negatives' softmax: a constant shift,
so a no-op up to rounding; kept to compute what ALBEF computes."""


@dataclass
class RetrievalTargets:
    """What the teacher gives one micro-batch of retrieval fine-tuning."""

    image_feat_m: Tensor
    """[B, D] momentum image features of the whole global batch (all ranks, stream order)."""
    text_feat_m: Tensor
    """[B, D]"""
    image_queue: Tensor
    """[D, Q] the queue before this step's push."""
    text_queue: Tensor
    index_all: Tensor
    """[B + Q] long: the image index of every column (the global batch's, then the queue's)."""
    offset: int
    alpha: float
    negatives_seed: int


def albef_retrieval_losses(model, batch: dict, teacher: RetrievalTargets) -> TaskResult:
    """ALBEF's retrieval fine-tuning of this micro-batch's b pairs: ITC whose positives are every
    column of the same image (in the global batch and the queue), with the temperature learnt
    unclamped; ITM on hard negatives never drawn from the same image. Sums over b rows and 3b pairs."""
    if batch["n_images"] < 2:
        raise ValueError(f"a micro-batch of {batch['n_items']} pairs shows one image only, so ITM has no negative "
                         "to draw (ALBEF fails here too); raise data.micro_batch_size or data.shuffle_buffer")
    image, text, image_feat, text_feat = student_features(model, batch)
    b, offset = image_feat.size(0), teacher.offset
    positives = objectives.shared_index_targets(batch["image_index"], teacher.index_all)  # [b, B+Q]
    itc = objectives.itc_loss(image_feat, text_feat, teacher.image_feat_m, teacher.text_feat_m, teacher.image_queue,
                              teacher.text_queue, model.temp.float()[0], teacher.alpha, offset, positives)
    generator = torch.Generator(device=image.device).manual_seed(teacher.negatives_seed)
    shift = RETRIEVAL_WEIGHT_SHIFT
    itm_sum, itm_correct = hard_negative_itm(model, image, text, batch, itc.sim_i2t[:, offset:offset + b] + shift,
                                             itc.sim_t2i[:, offset:offset + b] + shift, generator)
    return task_result(model, b, {"itc": itc.loss * b, "itm": itm_sum}, itm_correct, {})
