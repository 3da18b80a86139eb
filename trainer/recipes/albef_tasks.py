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
    image = model.image_tokens(batch["pixels"])  # [b, 1+P, Hv]
    text = model.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [b, L, H]
    # ITC in fp32: the 65,536-column softmax and the temperature do not belong in bf16.
    image_feat = F.normalize(model.vision_proj(image[:, 0]).float(), dim=-1)  # [b, D]
    text_feat = F.normalize(model.text_proj(text[:, 0]).float(), dim=-1)  # [b, D]
    b, offset = image_feat.size(0), teacher.offset
    itc = objectives.itc_loss(image_feat, text_feat, teacher.image_feat_m, teacher.text_feat_m,
                              teacher.image_queue, teacher.text_queue, model.temp.float()[0], teacher.alpha, offset)
    generator = torch.Generator(device=image.device).manual_seed(teacher.negatives_seed)
    itm_sum, itm_correct = hard_negative_itm(model, image, text, batch, itc.sim_i2t[:, offset:offset + b],
                                             itc.sim_t2i[:, offset:offset + b], generator)
    losses = {"itc": itc.loss * b, "itm": itm_sum, "mlm": distilled_mlm(model, image, batch, teacher)}
    counts = {"itc": b, "itm": 3 * b, "itm_acc": 3 * b, "mlm": batch["mlm_index"].numel(), "temp": b}
    stats = {**{k: v.detach() for k, v in losses.items()}, "itm_acc": itm_correct,
             "temp": model.temp.detach().float()[0] * b}
    # torch.full fills on the device; torch.tensor(v, device=...) would copy from the host and wait
    return TaskResult(losses, stats, {k: torch.full((), float(v), device=image.device) for k, v in counts.items()})


def hard_negative_itm(model, image: Tensor, text: Tensor, batch: dict, sim_i2t: Tensor, sim_t2i: Tensor,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Summed CE and correct count over b positives, b (image, hard negative text) and b
    (hard negative image, text) pairs."""
    mask = batch["attn_mask"]
    neg_text, neg_image = objectives.sample_hard_negatives(sim_i2t, sim_t2i, batch["image_ids"], generator)
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
