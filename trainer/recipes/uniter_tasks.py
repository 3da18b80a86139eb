"""What each UNITER task runs inside the engine's forward: the model, then its objective.

Each function is `(model, batch) -> TaskResult` and is handed to the engine as
`engine(batch, fn)`, so it runs inside the DeepSpeed module's forward (ZeRO-3 gathers
the parameters it reads). Conditional masking: MLM batches mask text only, MRM batches
regions only (data/collate.py), so each sees the other modality whole.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from kernels.masked_gather import masked_gather
from kernels.ot import ot_distance
from trainer.objectives.base import TaskResult
from trainer.objectives.itm import WraConfig, itm_loss, split_text_regions, take_rows
from trainer.objectives.mlm import mlm_loss
from trainer.objectives.mrm import mrc_kl_loss, mrc_loss, mrfr_loss

TaskFn = Callable[..., TaskResult]


def mlm(model, batch: dict) -> TaskResult:
    # A packed batch's rows are [R, Lp, H]: collate moved mlm_index into that layout already.
    hidden = model.encode(batch)  # [B, L, H] or [R, Lp, H]
    masked = masked_gather(hidden, batch["mlm_index"])  # [N, H]
    logits = model.mlm_logits(masked).float()  # [N, V]; CE in fp32 under bf16/fp16
    return mlm_loss(logits, batch["mlm_targets"])


def _masked_regions(model, batch: dict) -> Tensor:
    """Hidden states of the masked regions [N, H] (regions masked, text whole)."""
    hidden = model.encode(batch, img_masks=batch["img_masks"])  # [B, L, H] or [R, Lp, H]
    return masked_gather(hidden, batch["mrm_index"])  # [N, H]


def mrfr(model, batch: dict) -> TaskResult:
    pred = model.mrfr_features(_masked_regions(model, batch)).float()  # [N, D]
    return mrfr_loss(pred, batch["mrfr_targets"])


def mrc(model, batch: dict) -> TaskResult:
    logits = model.mrc_logits(_masked_regions(model, batch)).float()  # [N, K]
    return mrc_loss(logits, batch["mrc_soft_labels"])


def mrc_kl(model, batch: dict) -> TaskResult:
    logits = model.mrc_logits(_masked_regions(model, batch)).float()  # [N, K]
    return mrc_kl_loss(logits, batch["mrc_soft_labels"])


def itm(model, batch: dict, wra: WraConfig = WraConfig()) -> TaskResult:
    """ITM on the pooled [CLS] state, plus WRA: IPOT optimal transport between the last-layer
    text states (with [CLS] and [SEP]) and region states, in fp32, plan without gradient."""
    hidden = model.encode(batch)  # [B, L, H] or packed rows [R, Lp, H]
    logits = model.itm_logits(hidden, batch.get("cls_index")).float()  # [B, 2]
    if wra.weight == 0:
        return itm_loss(logits, batch["itm_targets"])
    txt, img, txt_pad, img_pad = split_text_regions(hidden, batch)
    dist = ot_distance(txt.float(), img.float(), txt_pad, img_pad,
                       beta=wra.beta, iterations=wra.iterations, k=wra.k)  # [B]
    return itm_loss(logits, batch["itm_targets"], dist, wra.weight)


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


def itm_hard(model, batch: dict, wra: WraConfig = WraConfig()) -> TaskResult:
    """ITM + WRA on the B positives and each text's hardest negative (`collate_itm_hard` packs
    each text with its own image and up to k other images of the micro-batch).

    The scoring pass builds no autograd graph; the selected B + M rows are then encoded
    again with gradient and go through `itm` unchanged, so the loss has `n_items` = B + M
    terms. Selection stays on the device (no host sync).
    """
    n_pos = batch["hard_candidates"].size(0)
    rows = torch.arange(n_pos, device=batch["input_ids"].device)  # [B] the positives
    if batch["hard_texts"].numel():  # a shape, not a value: no sync
        rows = torch.cat([rows, hardest_negatives(model, batch)])  # [B + M]
    return itm(model, take_rows(batch, rows), wra)


def task_functions(wra: WraConfig = WraConfig()) -> dict[str, TaskFn]:
    """Task name -> what its forward runs, with the run's WRA settings bound."""
    return {"mlm": mlm, "itm": functools.partial(itm, wra=wra), "itm-hard": functools.partial(itm_hard, wra=wra),
            "mrfr": mrfr, "mrc": mrc, "mrc-kl": mrc_kl}
