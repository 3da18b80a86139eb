"""ALBEF's objectives on features and logits (docs/models.md, "ALBEF"): ITC against momentum queues with
soft targets, hard-negative sampling for ITM, MLM with momentum distillation.

The functions here take tensors, not models, so each formula can be checked on its own;
the ALBEF model feeds them. Shapes: B pairs, D = 256 projection, Q queue length, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

TEMP_MIN, TEMP_MAX = 0.001, 0.5


@torch.no_grad()
def clamp_temperature_(temp: Tensor) -> None:
    """In place, outside autograd (ALBEF): the gradient is then taken at the clamped value,
    where a differentiable clamp would zero it whenever the value is out of range."""
    temp.clamp_(TEMP_MIN, TEMP_MAX)


def alpha_at(alpha: float, step: int, steps_per_epoch: int) -> float:
    """Distillation weight: ramped linearly from 0 over the first epoch, then `alpha`.
    `step` counts optimizer steps from 0 (ALBEF: `alpha * min(1, i / len(loader))` in epoch 0)."""
    if steps_per_epoch <= 0 or step >= steps_per_epoch:
        return alpha
    return alpha * step / steps_per_epoch


@dataclass
class ItcResult:
    loss: Tensor
    """Scalar: mean of the i2t and t2i cross-entropies against the soft targets, over this rank's rows."""
    sim_i2t: Tensor
    """[b, B + Q] student image-to-text similarities / temp (global batch first, then the queue)."""
    sim_t2i: Tensor
    """[b, B + Q]"""


def soft_targets(sim_m: Tensor, alpha: float, offset: int = 0, positives: Optional[Tensor] = None) -> Tensor:
    """`alpha * softmax(momentum sims) + (1 - alpha) * positives`; by default one-hot, row i's positive
    being column offset + i."""
    if positives is None:
        b = sim_m.size(0)
        positives = torch.zeros_like(sim_m)
        positives[:, offset:offset + b].fill_diagonal_(1.0)
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * positives


def shared_index_targets(idx: Tensor, idx_all: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALBEF retrieval's targets [b, B + Q]: every column showing the row's image (`idx` [b] against
    `idx_all` [B + Q], the global batch then the queue) is a positive, weights summing to 1 per row.
    A row always has one: its own pair is in the global batch."""
    positives = (idx[:, None] == idx_all[None, :]).to(dtype)  # [b, B+Q]
    return positives / positives.sum(1, keepdim=True)


def itc_loss(image_feat: Tensor, text_feat: Tensor, image_feat_m_all: Tensor, text_feat_m_all: Tensor,
             image_queue: Tensor, text_queue: Tensor, temp: Tensor, alpha: float, offset: int = 0,
             positives: Optional[Tensor] = None) -> ItcResult:
    """Image-text contrastive loss of this rank's b pairs.

    image_feat, text_feat          [b, D] student features of this rank, L2-normalised
    image_feat_m_all, text_feat_m_all
                                   [B, D] momentum features of the whole global batch (all ranks,
                                   rank order; no gradient); this rank's rows start at `offset`
    image_queue, text_queue        [D, Q] momentum features of earlier steps, before this step's push
    temp                           scalar (pretraining clamps it first; retrieval fine-tuning does not)
    positives                      [b, B+Q] target weights of the true pairs (`shared_index_targets`);
                                   None: one-hot on each row's own pair

    The candidates are the global batch plus the queue on every rank, so 2 ranks give the
    mean loss of 1 rank with their joint batch (ALBEF's own code uses each rank's local batch).
    """
    b = image_feat.size(0)
    with torch.no_grad():
        image_all = torch.cat([image_feat_m_all.t(), image_queue], dim=1)  # [D, B+Q]
        text_all = torch.cat([text_feat_m_all.t(), text_queue], dim=1)  # [D, B+Q]
        image_m = image_feat_m_all[offset:offset + b]  # [b, D]
        text_m = text_feat_m_all[offset:offset + b]  # [b, D]
        targets_i2t = soft_targets(image_m @ text_all / temp, alpha, offset, positives)  # [b, B+Q]
        targets_t2i = soft_targets(text_m @ image_all / temp, alpha, offset, positives)  # [b, B+Q]
    sim_i2t = image_feat @ text_all / temp  # [b, B+Q]
    sim_t2i = text_feat @ image_all / temp  # [b, B+Q]
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return ItcResult((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i)


@torch.no_grad()
def hard_negative_weights(sim: Tensor, image_ids: Tensor) -> Tensor:
    """[B, B] sampling weights: the in-batch softmax of `sim` ([B, B], row = anchor) with every
    pair of the same image (the diagonal included) zeroed, not renormalised. A row left with no
    weight (every candidate shares its image, or the softmax underflowed) falls back to uniform
    over the other images, or over the other pairs if there are none: multinomial needs a
    positive row and checking for one would cost a host sync."""
    weights = F.softmax(sim.float(), dim=1)
    same = image_ids[:, None] == image_ids[None, :]  # [B, B]
    weights = weights.masked_fill(same, 0.0)
    other_images = (~same).float()
    other_pairs = 1.0 - torch.eye(sim.size(0), device=sim.device)
    fallback = torch.where(other_images.sum(1, keepdim=True) > 0, other_images, other_pairs)
    return torch.where(weights.sum(1, keepdim=True) > 0, weights, fallback)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor,
                          generator: torch.Generator | None = None, hard: bool = True) -> tuple[Tensor, Tensor]:
    """One negative text per image and one negative image per text, drawn with one
    `torch.multinomial` per direction over the whole batch (no loop, no host sync).
    `hard=False` (`model.itm_negatives: random`) draws uniformly among the other images' pairs instead.

    sim_i2t, sim_t2i  [B, B] student similarities among this rank's pairs (ITC's columns of this
                      rank's block), whose fused embeddings are at hand
    image_ids         [B] pairs with equal ids show the same image and are never negatives
    Returns (negative text index per image [B], negative image index per text [B]).
    """
    if not hard:  # softmax of a constant row: uniform, with the same-image exclusion kept
        sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
    neg_text = torch.multinomial(hard_negative_weights(sim_i2t, image_ids), 1, generator=generator)[:, 0]
    neg_image = torch.multinomial(hard_negative_weights(sim_t2i, image_ids), 1, generator=generator)[:, 0]
    return neg_text, neg_image


def itm_labels(batch_size: int, device: torch.device) -> Tensor:
    """[3B]: the B positives, then B (image, negative text) and B (negative image, text) pairs."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def distilled_mlm_loss(logits: Tensor, logits_m: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """`(1 - alpha) * CE(targets) + alpha * soft-CE(softmax(momentum logits))`, both averaged over
    the masked positions. The heads see only those positions (gathered from collate's flat
    positions, as UNITER's MLM), which is ALBEF's `loss[labels != -100].mean()` without the
    boolean mask's host sync.

    logits, logits_m  [N, V] student and momentum MLM logits at the N masked positions
    targets           [N] original token ids
    """
    student = F.log_softmax(logits.float(), dim=-1)  # [N, V]
    ce = F.nll_loss(student, targets, reduction="mean")
    if alpha == 0:
        return ce
    teacher = F.softmax(logits_m.float(), dim=-1).detach()  # [N, V]
    distill = -(student * teacher).sum(-1).mean()
    return (1.0 - alpha) * ce + alpha * distill


def distilled_classification_loss(logits: Tensor, logits_m: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """ALBEF's VE / NLVR2 loss, summed over the b examples: per example `(1 - alpha) * CE(label) + alpha *
    soft-CE(softmax(momentum logits))`.

    logits, logits_m  [b, C] student and momentum logits
    labels            [b] class indices
    """
    student = F.log_softmax(logits.float(), dim=-1)  # [b, C]
    ce = F.nll_loss(student, labels, reduction="sum")
    if alpha == 0:
        return ce
    distill = -(student * F.softmax(logits_m.float(), dim=-1).detach()).sum()
    return (1.0 - alpha) * ce + alpha * distill


TA_PAIR_PROB = 2.0 / 3.0
"""Text assignment: how often the caption's own picture is one of the two (ALBEF: `rand > 1/3`)."""


def text_assignment_draws(weights: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """NLVR2's text-assignment pairs for a batch of b captions, caption i of picture i (ALBEF's
    `model_pretrain_nlvr`, drawn at once rather than in a loop: the same distribution).

    weights  [b, b] partner weights, row i over the other pictures (diagonal 0)
    returns  (left [b], right [b], labels [b]) long: with probability 2/3 picture i and one partner
             j ~ weights[i], i on the left (label 0) or the right (label 1) at 1/2 each; otherwise two
             distinct partners drawn from weights[i] (label 2, the caption fits neither)
    """
    b = weights.size(0)
    if b < 3:
        raise ValueError(f"text assignment needs >= 3 pictures per micro-batch to draw two partners of another "
                         f"picture, got {b}; raise data.micro_batch_size")
    device = weights.device
    pair = torch.rand(b, generator=generator, device=device) < TA_PAIR_PROB  # [b]
    own_left = torch.rand(b, generator=generator, device=device) < 0.5  # [b]
    partners = torch.multinomial(weights, 2, replacement=False, generator=generator)  # [b, 2]
    own = torch.arange(b, device=device)
    j = partners[:, 0]  # the first of two draws without replacement is a draw from weights[i]
    left = torch.where(pair, torch.where(own_left, own, j), partners[:, 0])
    right = torch.where(pair, torch.where(own_left, j, own), partners[:, 1])
    labels = torch.where(pair, torch.where(own_left, 0, 1), 2)
    return left, right, labels


# ---------------------------------------------------------------------------- VQA (answer generation)


def answer_targets(answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """[n, La-1] next-token targets of `[CLS] a [SEP]` answers: ids from position 1 on, -100 on padding."""
    return answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)


def answer_token_losses(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """[n] per answer the summed next-token CE of its tokens after [CLS], [SEP] included (pads ignored).
    logits [n, La, V] are the decoder's at every input position."""
    targets = answer_targets(answer_ids, answer_mask)  # [n, La-1]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return ce.sum(1)


def distilled_answer_losses(logits: Tensor, logits_m: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                            alpha: float) -> Tensor:
    """[n] ALBEF VQA's per-answer loss: `(1 - alpha) * CE + alpha * sum over the answer's tokens of
    soft-CE(softmax(teacher logits))`, both over the vocabulary. (ALBEF's `model_vqa` passes no alpha to its
    decoder, so there it is 0, and its decoder normalises the student over positions; docs/downstream.md.)"""
    ce = answer_token_losses(logits, answer_ids, answer_mask)
    if alpha == 0:
        return ce
    student = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [n, La-1, V]
    teacher = F.softmax(logits_m[:, :-1].float(), dim=-1).detach()
    valid = answer_targets(answer_ids, answer_mask) != -100  # [n, La-1]
    distill = (-(teacher * student).sum(-1) * valid).sum(1)
    return (1.0 - alpha) * ce + alpha * distill


def first_token_candidates(first_logits: Tensor, answer_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(probabilities [B, k], answer indices [B, k]): per question the k candidate answers whose first word
    piece (`answer_ids[:, 1]`) the decoder's first step finds most likely (k capped at the candidates)."""
    probs = F.softmax(first_logits.float(), dim=-1).index_select(1, answer_ids[:, 1])  # [B, A]
    return probs.topk(min(k, answer_ids.size(0)), dim=1)


def reranked_answer_scores(top_probs: Tensor, answer_losses: Tensor) -> Tensor:
    """[B, k] ALBEF's ranking score `log p(first word piece) - CE_sum(whole answer)`. The answer's CE already
    holds -log p(first word piece), so the first token counts twice (ALBEF's `rank_answer`, kept as is)."""
    return top_probs.log() - answer_losses
