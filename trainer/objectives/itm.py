"""Image-text matching with word-region alignment (UNITER; docs/models.md, "ITM and WRA").

ITM: 2-way CE on the pooled [CLS] state; negatives were made in collate by
swapping in the image of a different `image_id` with p = 0.5 (target 1 = match).
WRA: IPOT optimal transport between the last-layer text states (with [CLS] and
[SEP]) and region states, in fp32, plan without gradient:
`itm_total = CE.mean() + weight * (sum d_pos - sum d_neg) / B`.

Hard-negative ITM ("itm-hard", UNITER's retrieval fine-tuning recipe) picks its rows in
trainer/recipes/uniter_tasks.py and trains this same loss on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.ot import wra_loss
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
    """Packed `[txt_i | img_i | pad]` states -> (txt [B, Lt, H], img [B, Ni, H], txt_pad, img_pad).

    `hidden` may also be a multi-sample packed batch's rows [R, Lp, H] (its `unpack_index`)."""
    if batch.get("unpack_index") is not None:
        hidden = unpack_rows(hidden, batch["unpack_index"])  # [B, L, H]
    b, length, h = hidden.shape
    lt, ni = batch["input_ids"].size(1), batch["img_feat"].size(1)
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]  # [B], [B]
    txt_pad = torch.arange(lt, device=hidden.device)[None] >= txt_lens[:, None]  # [B, Lt]
    cols = torch.arange(ni, device=hidden.device)[None]  # [1, Ni]
    img_pad = cols >= num_bbs[:, None]  # [B, Ni]
    index = (txt_lens[:, None] + cols).masked_fill(img_pad, 0).clamp_max(length - 1)  # [B, Ni]
    img = torch.gather(hidden, 1, index[..., None].expand(-1, -1, h))  # [B, Ni, H]
    return hidden[:, :lt], img, txt_pad, img_pad


def unpack_rows(hidden: Tensor, unpack_index: Tensor) -> Tensor:
    """Packed rows [R, Lp, H] -> the per-sample layout [B, L, H] at the flat positions
    `unpack_index` [B, L]; slots past a sample's length read some valid state (masked later)."""
    flat = hidden.reshape(-1, hidden.size(-1)).index_select(0, unpack_index.reshape(-1))  # [B * L, H]
    return flat.view(*unpack_index.shape, hidden.size(-1))


def itm_loss(logits: Tensor, targets: Tensor, dist: Optional[Tensor] = None, weight: float = 0.0) -> TaskResult:
    """logits [B, 2] (fp32), targets [B] (1 = match), dist [B] the OT distance of each pair (None:
    no WRA) -> `CE.sum() + weight * (sum d_pos - sum d_neg)` as a sum over the B pairs."""
    ce_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().float()
    stats = {"loss": ce_sum.detach(), "acc": correct}
    if dist is None:
        return TaskResult({"loss": ce_sum}, stats)
    ot_loss, pos_sum, neg_sum, n_pos, n_neg = wra_loss(dist, targets)
    # ot_loss is already divided by B; as a sum over the batch's B terms it is ot_loss * B.
    ot_sum = ot_loss * targets.numel()
    stats.update(ot_loss=ot_sum.detach(), ot_pos=pos_sum.detach(), ot_neg=neg_sum.detach(),
                 total=(ce_sum + weight * ot_sum).detach())
    counts = {"ot_pos": n_pos, "ot_neg": n_neg}
    return TaskResult({"loss": ce_sum + weight * ot_sum}, stats, counts)


# Per-pair tensors of a packed ITM batch; `position_ids` [1, Lt] is shared by all rows.
_ROW_KEYS = ("input_ids", "txt_lens", "img_feat", "img_pos_feat", "num_bbs", "attn_masks",
             "gather_index", "itm_targets", "txt_type_ids", "img_type_ids")


def take_rows(batch: dict, rows: Tensor) -> dict:
    """The pairs `rows` [R'] (long, on the batch's device) of a packed batch, same columns.

    Trailing all-pad columns are kept: trimming them needs the selected rows' max
    length on the host (a sync); pads are masked out of attention, so they only cost compute.
    """
    assert "segment_ids" not in batch, "take_rows needs one sample per row; itm-hard batches are never packed"
    out = dict(batch)
    for key in _ROW_KEYS:
        if key in batch:  # itm_targets (ITM) or txt/img_type_ids (fine-tuning) where a batch has them
            out[key] = batch[key].index_select(0, rows)
    return out
