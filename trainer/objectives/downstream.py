"""Downstream training and eval functions (docs/downstream.md), run inside
`UniterForFinetuning.forward` as `model(batch, fn)`.

Training functions return a `TaskResult` whose `losses["loss"]` is the SUM over the batch's
loss terms (the run divides by the step's `n_items`): VQA/VE one term per example (BCE summed
over the answers, so the mean over examples is UNITER's mean x A), retrieval n x (G - 1) hinge
terms, NLVR2/RE one per example, VCR one per row. Losses and logits are fp32. No host syncs.

Eval functions return the raw per-row outputs, with no loss: VQA/VE logits [B, A], retrieval
scores [R] (raw, no sigmoid), NLVR2 logits [n, 2], RE scores [n, max_nbb], VCR column 1 [4q].
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.models.downstream import HeadConfig
from trainer.objectives.base import TaskResult
from trainer.objectives.itm import take_rows

RANK_MARGIN = 0.2  # UNITER's hinge margin for retrieval and RE rank
VCR_CHOICES = 4


def _result(loss_terms: Tensor, **stats: Tensor) -> TaskResult:
    """loss_terms [N] (with gradient) -> losses {"loss": sum}, stats {"loss": detached sum, ...}."""
    loss = loss_terms.sum()
    return TaskResult(losses={"loss": loss}, stats={"loss": loss.detach(), **stats})


# ---------------------------------------------------------------- VQA / VE

def vqa_logits(model, batch: dict) -> Tensor:
    return model.vqa_logits(model.encode(batch)).float()  # [B, A]


def vqa_train(model, batch: dict) -> TaskResult:
    logits = vqa_logits(model, batch)  # [B, A]
    targets = batch["targets"].to(logits.dtype)  # [B, A] soft scores
    per_example = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)  # [B]
    score = targets.gather(1, logits.argmax(1, keepdim=True)).sum()  # VQA score of the argmax answers
    return _result(per_example, score=score.detach())


# ---------------------------------------------------------------- retrieval

def retrieval_scores(model, batch: dict) -> Tensor:
    return model.rank_scores(model.encode(batch)).float().squeeze(-1)  # [R]


def retrieval_train(model, batch: dict) -> TaskResult:
    scores = retrieval_scores(model, batch)  # [R]
    size = batch["sample_size"]
    if not isinstance(size, int) or size < 2 or scores.size(0) % size:
        raise ValueError(
            f"sample_size must be an int G >= 2 dividing the {scores.size(0)} rows (groups of one positive "
            f"and G - 1 negatives, docs/downstream.md), got {size!r}"
        )
    sig = torch.sigmoid(scores).view(-1, size)  # [n, G]; column 0 is the positive
    hinge = torch.clamp(RANK_MARGIN + sig[:, 1:] - sig[:, :1], min=0)  # [n, G - 1]
    acc = (sig[:, :1] > sig[:, 1:]).sum()  # pairs where the positive outscores the negative
    return _result(hinge.reshape(-1), acc=acc.detach())


@torch.no_grad()
def hardest_rows(model, batch: dict) -> Tensor:
    """Rows of each block's positive and its `hard_size` highest-scoring negatives -> [2Q * (1 + k)].

    Scored in eval mode, as UNITER's hard-negative model does, so the pick is the model's and not
    dropout's; the previous mode is restored afterwards (also on error). No host sync."""
    group, k = batch["hard_group"], batch["hard_size"]
    was_training = model.training
    model.eval()
    try:
        scores = retrieval_scores(model, batch).view(-1, group)  # [2Q, 1 + C]
    finally:
        model.train(was_training)
    top = scores[:, 1:].topk(k, dim=1).indices + 1  # [2Q, k], unsorted order is not needed
    keep = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)  # [2Q, 1 + k], positive first
    starts = torch.arange(scores.size(0), device=keep.device)[:, None] * group  # [2Q, 1]
    return (keep + starts).reshape(-1)


def retrieval_hard_train(model, batch: dict) -> TaskResult:
    """The hinge of `retrieval_train` on each block's positive and its hardest negatives, encoded again
    with gradient (docs/downstream.md, "Hard negatives")."""
    chosen = take_rows(batch, hardest_rows(model, batch))
    chosen["sample_size"] = 1 + batch["hard_size"]
    return retrieval_train(model, chosen)


# ---------------------------------------------------------------- NLVR2

def nlvr2_logits(model, batch: dict) -> Tensor:
    return model.nlvr2_logits(model.encode(batch), batch["attn_masks"]).float()  # [n, 2]


def _classification(logits: Tensor, targets: Tensor) -> TaskResult:
    """Summed CE over rows and the count of right argmaxes."""
    targets = targets.view(-1)  # [n]; UNITER's RE collate gives [n, 1]
    ce = F.cross_entropy(logits, targets, reduction="none")  # [n]
    acc = (logits.argmax(1) == targets).sum()
    return _result(ce, acc=acc.detach())


def nlvr2_train(model, batch: dict) -> TaskResult:
    return _classification(nlvr2_logits(model, batch), batch["targets"])


# ---------------------------------------------------------------- RE

def re_scores(model, batch: dict) -> Tensor:
    hidden = model.encode(batch)  # [n, L, H]
    return model.re_scores(hidden, batch["txt_lens"], batch["obj_masks"]).float()  # [n, N]


def re_train(model, batch: dict, loss: str = "cls") -> TaskResult:
    if loss not in ("cls", "rank"):
        raise ValueError(f"RE loss {loss!r} is not cls or rank")
    scores = re_scores(model, batch)  # [n, N]; pads -1e4
    if loss == "cls":
        return _classification(scores, batch["targets"])
    targets = batch["targets"].view(-1, 1)  # [n, 1]
    negative = re_rank_negatives(scores.detach(), targets, batch["re_rank_hard"], batch["re_rank_random"])  # [n, 1]
    sig = torch.sigmoid(scores)  # [n, N]
    hinge = torch.clamp(RANK_MARGIN + sig.gather(1, negative) - sig.gather(1, targets), min=0)  # [n, 1]
    acc = (scores.argmax(1, keepdim=True) == targets).sum()
    return _result(hinge.view(-1), acc=acc.detach())


def re_rank_negatives(scores: Tensor, targets: Tensor, hard: Tensor, random_pick: Tensor) -> Tensor:
    """Per example the best-scoring non-target region where `hard` [n] (drawn by the collate with
    p 0.3) else the collate's uniform non-target `random_pick` [n] -> [n, 1] long.

    scores [n, N] with pads at -1e4, so a pad is picked only where no other real region exists.
    """
    not_target = scores.scatter(1, targets, float("-inf"))  # [n, N]
    best = not_target.argmax(1, keepdim=True)  # [n, 1]
    hard = torch.as_tensor(hard, device=scores.device).view(-1, 1).bool()  # [n, 1]
    random_pick = torch.as_tensor(random_pick, device=scores.device).view(-1, 1).long()  # [n, 1]
    return torch.where(hard, best, random_pick)


# ---------------------------------------------------------------- VCR

def vcr_logits(model, batch: dict) -> Tensor:
    return model.vcr_logits(model.encode(batch)).float()  # [4q, 2]


def vcr_train(model, batch: dict) -> TaskResult:
    logits = vcr_logits(model, batch)  # [4q, 2]
    if logits.size(0) % VCR_CHOICES:
        raise ValueError(f"VCR batches hold {VCR_CHOICES} rows per question (question-major), got {logits.size(0)}")
    targets = batch["targets"].view(-1)  # [4q]; 1 on the right choice
    ce = F.cross_entropy(logits, targets, reduction="none")  # [4q]
    choice = logits[:, 1].view(-1, VCR_CHOICES).argmax(1, keepdim=True)  # [q, 1]
    right = targets.view(-1, VCR_CHOICES).gather(1, choice) == 1  # [q, 1]
    result = _result(ce, acc=right.sum().detach())
    # acc is per question, loss per row: acc gets its own denominator.
    result.counts = {"acc": torch.tensor(logits.size(0) // VCR_CHOICES, device=logits.device)}
    return result


def vcr_scores(model, batch: dict) -> Tensor:
    return vcr_logits(model, batch)[:, 1]  # [4q]


# ---------------------------------------------------------------- lookups

TaskFn = Callable[..., object]
_TRAIN = {"vqa": vqa_train, "ve": vqa_train, "retrieval": retrieval_train, "nlvr2": nlvr2_train, "vcr": vcr_train}
_PREDICT = {"vqa": vqa_logits, "ve": vqa_logits, "retrieval": retrieval_scores, "nlvr2": nlvr2_logits,
            "re": re_scores, "vcr": vcr_scores}


def training_function(head: HeadConfig) -> TaskFn:
    """`(model, batch) -> TaskResult` of the head's task (RE with `head.re_loss` bound)."""
    if head.task == "re":
        return functools.partial(re_train, loss=head.re_loss)
    return _TRAIN[head.task]


def prediction_function(head: HeadConfig) -> TaskFn:
    """`(model, batch) -> Tensor` of raw per-row outputs for evaluation (run under no_grad)."""
    return _PREDICT[head.task]
