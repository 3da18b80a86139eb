"""Image-text matching with word-region alignment (UNITER, DESIGN §3).

ITM: 2-way CE on the pooled [CLS] state; negatives were made in collate by
swapping in the image of a different `image_id` with p = 0.5 (target 1 = match).
WRA: IPOT optimal transport between the last-layer text states (with [CLS] and
[SEP]) and region states, in fp32, plan without gradient:
`itm_total = CE.mean() + weight * (sum d_pos - sum d_neg) / B`.

Hard-negative ITM ("itm-hard", UNITER's retrieval fine-tuning recipe): collate packs
each text with its own image and with up to k other images of the micro-batch; the
model scores the candidates without gradient, and the same ITM + WRA loss is then
trained on the B positives and each text's highest-scoring (hardest) negative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.ot import ot_distance, wra_loss
from trainer.objectives.base import TaskResult


@dataclass(frozen=True)
class WraConfig:
    weight: float = 0.1
    """Weight of the OT term in the ITM loss (UNITER: 0.1); 0 turns WRA off."""
    beta: float = 0.5
    """IPOT proximal step (UNITER: 0.5)."""
    iterations: int = 50
    k: int = 1
    """Inner Sinkhorn updates per IPOT iteration (UNITER: 1)."""

    def __post_init__(self) -> None:
        if self.weight < 0 or self.beta <= 0 or self.iterations < 1 or self.k < 1:
            raise ValueError("wra: weight >= 0, beta > 0, iterations >= 1 and k >= 1 are required")


def split_text_regions(hidden: torch.Tensor, batch: dict):
    """Packed `[txt_i | img_i | pad]` states -> (txt [B, Lt, H], img [B, Ni, H], txt_pad, img_pad)."""
    b, length, h = hidden.shape
    lt, ni = batch["input_ids"].size(1), batch["img_feat"].size(1)
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]  # [B], [B]
    txt_pad = torch.arange(lt, device=hidden.device)[None] >= txt_lens[:, None]  # [B, Lt]
    cols = torch.arange(ni, device=hidden.device)[None]  # [1, Ni]
    img_pad = cols >= num_bbs[:, None]  # [B, Ni]
    index = (txt_lens[:, None] + cols).masked_fill(img_pad, 0).clamp_max(length - 1)  # [B, Ni]
    img = torch.gather(hidden, 1, index[..., None].expand(-1, -1, h))  # [B, Ni, H]
    return hidden[:, :lt], img, txt_pad, img_pad


def itm_objective(model, batch: dict, wra: Optional[WraConfig] = WraConfig()) -> TaskResult:
    hidden = model.encode(batch)  # [B, L, H]
    logits = model.itm_logits(hidden).float()  # [B, 2]
    targets = batch["itm_targets"]  # [B]
    ce_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().float()
    stats = {"loss": ce_sum.detach(), "acc": correct}
    if wra is None or wra.weight == 0:
        return TaskResult(ce_sum, stats)
    txt, img, txt_pad, img_pad = split_text_regions(hidden, batch)
    dist = ot_distance(txt.float(), img.float(), txt_pad, img_pad,
                       beta=wra.beta, iterations=wra.iterations, k=wra.k)  # [B]
    ot_loss, pos_sum, neg_sum, n_pos, n_neg = wra_loss(dist, targets)
    # ot_loss is already divided by B; as a sum over the batch's B terms it is ot_loss * B.
    ot_sum = ot_loss * targets.numel()
    stats.update(ot_loss=ot_sum.detach(), ot_pos=pos_sum.detach(), ot_neg=neg_sum.detach(),
                 total=(ce_sum + wra.weight * ot_sum).detach())
    counts = {"ot_pos": n_pos, "ot_neg": n_neg}
    return TaskResult(ce_sum + wra.weight * ot_sum, stats, counts)


# Per-pair tensors of a packed ITM batch; `position_ids` [1, Lt] is shared by all rows.
_ROW_KEYS = ("input_ids", "txt_lens", "img_feat", "img_pos_feat", "num_bbs", "attn_masks",
             "gather_index", "itm_targets")


def take_rows(batch: dict, rows: Tensor) -> dict:
    """The pairs `rows` [R'] (long, on the batch's device) of a packed batch, same columns.

    Trailing all-pad columns are kept: trimming them needs the selected rows' max
    length on the host (a sync); pads are masked out of attention, so they only cost compute.
    """
    out = dict(batch)
    for key in _ROW_KEYS:
        out[key] = batch[key].index_select(0, rows)
    return out


@torch.no_grad()
def hardest_negatives(model, batch: dict) -> Tensor:
    """Row of the highest-scoring candidate of each text in `hard_texts` -> [M] long.

    Score = logit[1] - logit[0] (the log-odds of "match", monotone in softmax p(match)).
    Like UNITER's `UniterForImageTextRetrievalHardNeg`, the candidates are scored in eval
    mode, so the pick is the model's deterministic hardest negative and not dropout noise;
    the previous train/eval mode is restored afterwards (also on error).
    """
    n_pos, n_rows = batch["hard_candidates"].size(0), batch["input_ids"].size(0)
    cand = batch["hard_candidates"].index_select(0, batch["hard_texts"])  # [M, k]; -1 = none
    rows = torch.arange(n_pos, n_rows, device=cand.device)  # [R - B] the candidate rows
    was_training = model.training
    model.eval()
    try:
        logits = model.itm_logits(model.encode(take_rows(batch, rows))).float()  # [R - B, 2]
    finally:
        model.train(was_training)
    score = logits[:, 1] - logits[:, 0]  # [R - B]
    per_text = score[(cand - n_pos).clamp_min(0)].masked_fill(cand < 0, float("-inf"))  # [M, k]
    return cand.gather(1, per_text.argmax(1, keepdim=True)).squeeze(1)  # [M]


def itm_hard_objective(model, batch: dict, wra: Optional[WraConfig] = WraConfig()) -> TaskResult:
    """ITM + WRA on the B positives and each text's hardest negative (`collate_itm_hard`).

    The scoring pass builds no autograd graph; the selected B + M rows are then encoded
    again with gradient and go through `itm_objective` unchanged, so the loss has
    `n_items` = B + M terms. Selection stays on the device (no host sync).
    """
    n_pos = batch["hard_candidates"].size(0)
    rows = torch.arange(n_pos, device=batch["input_ids"].device)  # [B] the positives
    if batch["hard_texts"].numel():  # a shape, not a value: no sync
        rows = torch.cat([rows, hardest_negatives(model, batch)])  # [B + M]
    return itm_objective(model, take_rows(batch, rows), wra)
