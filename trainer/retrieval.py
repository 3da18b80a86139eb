"""Image-text retrieval on a held-out pixel split, ALBEF's evaluation: ITC similarities pick
`k` candidates per query, the ITM head re-scores them, and R@1/5/10 is the share of queries
whose true match ranks in the top 1/5/10 (text->image: the caption's image; image->text:
any of the image's captions). Usable during training, on any number of ranks.

Every rank embeds every image and text (the fusion needs all image tokens at hand, as in
ALBEF); the queries are then dealt out rank-strided in equal numbers, so every rank runs
the same forwards (ZeRO-3 gathers inside them) and the ranks of the true matches are
all-gathered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from data.collate_albef import caption_batch, eval_images, pre_caption
from data.loader import add_counts, iter_split, pin
from data.pixels import PixelConfig
from data.limits import DecodeLimits
from data.shards import decode_pixel_sample, iter_pixel_pairs
from data.storage import S3Options
from trainer.distributed import all_gather_rows
from trainer.models.albef import EMBED_TASK, ITM_SCORE_TASK

RECALL_AT = (1, 5, 10)
UNSCORED = -100.0
"""The score of a candidate outside a query's top k (ALBEF's score matrices start at -100)."""


@dataclass
class RetrievalSet:
    images: list
    """PIL images, one per distinct image_id, in order of first appearance."""
    input_ids: Tensor
    """[T, L] every caption, `[CLS] ... [SEP]` (downstream: `[CLS] ...`) padded to the longest."""
    attn_mask: Tensor
    """[T, L]"""
    text_image: Tensor
    """[T] long: index into `images` of each caption's picture."""
    text_ids: list[str] = field(default_factory=list)
    """The caption's sample key, per text (predictions files name rows by it)."""
    image_ids: list[str] = field(default_factory=list)
    """The image_id of each of `images`."""


def load_retrieval_set(shards: Sequence[str], tok, max_txt_len: int, s3: Optional[S3Options] = None,
                       limits: DecodeLimits = DecodeLimits(), skipped: Optional[dict[str, int]] = None,
                       downstream: bool = False) -> RetrievalSet:
    """Every good sample of the split; bad ones (by the budgets `limits` too) are left out as in training,
    and so are damaged or missing shards: all counted by reason into `skipped`. `downstream`: captions in
    ALBEF's fine-tuning form (`pre_caption`, `[CLS] ids` without [SEP]), as retrieval fine-tuning trains."""
    image_index: dict[str, int] = {}
    images, captions, text_image, text_ids = [], [], [], []
    for raw in iter_pixel_pairs(iter_split(shards, s3, skipped, limits.max_member_bytes), limits.max_captions):
        sample, reason = decode_pixel_sample(raw, tok, limits)
        if sample is None:
            if skipped is not None:
                add_counts(skipped, {reason: 1})
            continue
        if sample.image_id not in image_index:
            image_index[sample.image_id] = len(images)
            images.append(sample.image)
        captions.append(sample.caption)
        text_ids.append(sample.key)
        text_image.append(image_index[sample.image_id])
    if not captions:
        raise ValueError("the retrieval split has no readable picture-caption pair")
    if downstream:
        captions = [pre_caption(c) for c in captions]
    input_ids, attn = caption_batch(captions, tok, max_txt_len, sep=not downstream)
    return RetrievalSet(images, torch.from_numpy(input_ids), torch.from_numpy(attn), torch.tensor(text_image),
                        text_ids, list(image_index))


def _embed(engine, batches: Sequence[dict], device: torch.device) -> dict[str, Tensor]:
    outs = [engine(pin(b, device), EMBED_TASK) for b in batches]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def _my_queries(n: int, rank: int, world: int) -> Tensor:
    """Query indices of this rank: r, r + world, ... over n padded to a multiple of world
    (padding repeats the last query; its results are dropped)."""
    padded = -(-n // world) * world
    return torch.arange(rank, padded, world).clamp_max(n - 1)


def _rerank(engine, sims: Tensor, truth: Tensor, queries: Tensor, pairs, k: int, group: int,
            device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each query, its top-k ITC candidates [m, k], their ITM scores [m, k], and the rank (0 = first)
    of its best true match after re-scoring [m]. A true match outside the top k is ranked last (C - 1):
    it counts for R@K only when K covers every candidate, so R@K for K > k is a lower bound.

    sims [Q, C] ITC similarities; truth [Q, C] bool; pairs(q [n], c [n]) -> ITM batch."""
    last = sims.shape[1] - 1
    tops, scores, ranks = [], [], []
    for start in range(0, len(queries), group):
        q = queries[start:start + group]  # [g]
        top = sims[q].topk(k, dim=1).indices  # [g, k]
        flat_q = q[:, None].expand_as(top).reshape(-1)  # [g * k]
        score = engine(pin(pairs(flat_q, top.reshape(-1)), device), ITM_SCORE_TASK).view(len(q), k)  # [g, k]
        is_true = truth[q[:, None], top].to(device)  # [g, k]
        best_true = score.masked_fill(~is_true, float("-inf")).max(dim=1).values  # [g]
        above = (score > best_true[:, None]).sum(dim=1)  # [g]
        ranks.append(torch.where(is_true.any(dim=1), above, torch.full_like(above, last)))
        tops.append(top)
        scores.append(score.float().cpu())
    return torch.cat(tops), torch.cat(scores), torch.cat(ranks)


def _gather_in_query_order(rows: Tensor, n: int, world: int) -> Tensor:
    """Rank-strided per-rank results [m, ...] -> [n, ...] in query order."""
    gathered = all_gather_rows(rows)  # [world * m, ...], rank-major
    return gathered.view(world, -1, *rows.shape[1:]).transpose(0, 1).reshape(-1, *rows.shape[1:])[:n]


def _score_matrix(n_queries: int, n_candidates: int, top: Tensor, scores: Tensor) -> Tensor:
    """ALBEF's score matrix [Q, C]: each query's top-k candidates hold their ITM score, the rest -100."""
    matrix = torch.full((n_queries, n_candidates), UNSCORED)
    return matrix.scatter_(1, top.cpu(), scores)


def _recalls(prefix: str, ranks: Tensor) -> dict[str, float]:
    return {f"{prefix}_r{at}": 100.0 * (ranks < at).float().mean().item() for at in RECALL_AT}


@dataclass
class RetrievalScores:
    metrics: dict[str, float]
    """R@1/5/10 both ways (percent), their mean, R@1 by chance both ways."""
    t2i: Tensor
    """[T, I] float32: each text's top-k images by ITC hold their ITM logit, the rest -100 (ALBEF)."""
    i2t: Tensor
    """[I, T] float32: likewise per image."""


@torch.no_grad()
def retrieval_scores(engine, data: RetrievalSet, pixels: PixelConfig, *, k: int, batch_size: int,
                     device: torch.device, rank: int = 0, world: int = 1) -> RetrievalScores:
    """Collective. The score matrices of both directions and their recalls, the same on every rank."""
    n_images, n_texts = len(data.images), len(data.input_ids)
    engine.eval()
    try:
        image = _embed(engine, [{"pixels": eval_images(data.images[i:i + batch_size], pixels)}
                                for i in range(0, n_images, batch_size)], device)
        text = _embed(engine, [{"input_ids": data.input_ids[i:i + batch_size],
                                "attn_mask": data.attn_mask[i:i + batch_size]}
                               for i in range(0, n_texts, batch_size)], device)
        sims = (text["text_feat"] @ image["image_feat"].t()).cpu()  # [T, I]
        truth = data.text_image[:, None] == torch.arange(n_images)[None, :]  # [T, I]

        def pairs(texts: Tensor, images: Tensor) -> dict:
            return {"text_states": text["text_states"][texts.to(device)], "attn_mask": data.attn_mask[texts],
                    "image_tokens": image["image_tokens"][images.to(device)]}

        t2i = _rerank(engine, sims, truth, _my_queries(n_texts, rank, world), pairs,
                      min(k, n_images), max(1, batch_size // min(k, n_images)), device)
        i2t = _rerank(engine, sims.t(), truth.t(), _my_queries(n_images, rank, world),
                      lambda images, texts: pairs(texts, images),
                      min(k, n_texts), max(1, batch_size // min(k, n_texts)), device)
    finally:
        engine.train()
    t2i = [_gather_in_query_order(part.to(device), n_texts, world).cpu() for part in t2i]
    i2t = [_gather_in_query_order(part.to(device), n_images, world).cpu() for part in i2t]
    metrics = {**_recalls("t2i", t2i[2]), **_recalls("i2t", i2t[2])}
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    metrics.update(chance_levels(data.text_image, n_images))
    return RetrievalScores(metrics, _score_matrix(n_texts, n_images, t2i[0], t2i[1]),
                           _score_matrix(n_images, n_texts, i2t[0], i2t[1]))


def retrieval_metrics(engine, data: RetrievalSet, pixels: PixelConfig, *, k: int, batch_size: int,
                      device: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Collective. R@1/5/10 in both directions (percent), their mean, and R@1 by chance in both directions."""
    return retrieval_scores(engine, data, pixels, k=k, batch_size=batch_size, device=device, rank=rank,
                            world=world).metrics


def chance_levels(text_image: Tensor, n_images: int) -> dict[str, float]:
    """R@1 (percent) of a random ranking: a text has one true image among n_images; an image's
    true texts are its own captions among all texts (on average also 100 / n_images)."""
    n_texts = len(text_image)
    captions = torch.bincount(text_image, minlength=n_images).double()  # [I] texts per image
    return {"t2i_r1_chance": 100.0 / n_images,
            "i2t_r1_chance": 100.0 * (captions / n_texts).mean().item()}
