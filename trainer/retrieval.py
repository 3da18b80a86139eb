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

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from data.collate_albef import caption_batch, eval_images
from data.loader import add_counts, iter_split, pin
from data.pixels import PixelConfig
from data.limits import DecodeLimits
from data.shards import decode_pixel_sample, iter_pixel_pairs
from data.storage import S3Options
from trainer.distributed import all_gather_rows
from trainer.models.albef import EMBED_TASK, ITM_SCORE_TASK

RECALL_AT = (1, 5, 10)


@dataclass
class RetrievalSet:
    images: list
    """PIL images, one per distinct image_id, in order of first appearance."""
    input_ids: Tensor
    """[T, L] every caption, `[CLS] ... [SEP]` padded to the longest."""
    attn_mask: Tensor
    """[T, L]"""
    text_image: Tensor
    """[T] long: index into `images` of each caption's picture."""


def load_retrieval_set(shards: Sequence[str], tok, max_txt_len: int, s3: Optional[S3Options] = None,
                       limits: DecodeLimits = DecodeLimits(), skipped: Optional[dict[str, int]] = None) -> RetrievalSet:
    """Every good sample of the split; bad ones (by the budgets `limits` too) are left out as in training,
    and so are damaged or missing shards: all counted by reason into `skipped`."""
    image_index: dict[str, int] = {}
    images, captions, text_image = [], [], []
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
        text_image.append(image_index[sample.image_id])
    if not captions:
        raise ValueError("the retrieval split has no readable picture-caption pair")
    input_ids, attn = caption_batch(captions, tok, max_txt_len)
    return RetrievalSet(images, torch.from_numpy(input_ids), torch.from_numpy(attn), torch.tensor(text_image))


def _embed(engine, batches: Sequence[dict], device: torch.device) -> dict[str, Tensor]:
    outs = [engine(pin(b, device), EMBED_TASK) for b in batches]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def _my_queries(n: int, rank: int, world: int) -> Tensor:
    """Query indices of this rank: r, r + world, ... over n padded to a multiple of world
    (padding repeats the last query; its results are dropped)."""
    padded = -(-n // world) * world
    return torch.arange(rank, padded, world).clamp_max(n - 1)


def _true_match_ranks(engine, sims: Tensor, truth: Tensor, queries: Tensor, pairs, k: int,
                      group: int, device: torch.device) -> Tensor:
    """For each query, the rank (0 = first) of its best true match after ITM re-scoring of
    its top-k ITC candidates. A true match outside the top k is ranked last (C - 1): it
    counts for R@K only when K covers every candidate, so R@K for K > k is a lower bound.

    sims [Q, C] ITC similarities; truth [Q, C] bool; pairs(q [n], c [n]) -> ITM batch."""
    last = sims.shape[1] - 1
    ranks = []
    for start in range(0, len(queries), group):
        q = queries[start:start + group]  # [g]
        top = sims[q].topk(k, dim=1).indices  # [g, k]
        flat_q = q[:, None].expand_as(top).reshape(-1)  # [g * k]
        scores = engine(pin(pairs(flat_q, top.reshape(-1)), device), ITM_SCORE_TASK).view(len(q), k)  # [g, k]
        is_true = truth[q[:, None], top].to(device)  # [g, k]
        best_true = scores.masked_fill(~is_true, float("-inf")).max(dim=1).values  # [g]
        above = (scores > best_true[:, None]).sum(dim=1)  # [g]
        ranks.append(torch.where(is_true.any(dim=1), above, torch.full_like(above, last)))
    return torch.cat(ranks)


def _gather_in_query_order(ranks: Tensor, n: int, world: int) -> Tensor:
    """Rank-strided per-rank results -> [n] in query order."""
    gathered = all_gather_rows(ranks)  # [world * m], rank-major
    return gathered.view(world, -1).t().reshape(-1)[:n]


def _recalls(prefix: str, ranks: Tensor) -> dict[str, float]:
    return {f"{prefix}_r{at}": 100.0 * (ranks < at).float().mean().item() for at in RECALL_AT}


@torch.no_grad()
def retrieval_metrics(engine, data: RetrievalSet, pixels: PixelConfig, *, k: int, batch_size: int,
                      device: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """R@1/5/10 in both directions (percent), their mean, and R@1 by chance in both directions."""
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

        t2i = _true_match_ranks(engine, sims, truth, _my_queries(n_texts, rank, world), pairs,
                                min(k, n_images), max(1, batch_size // min(k, n_images)), device)
        i2t = _true_match_ranks(engine, sims.t(), truth.t(), _my_queries(n_images, rank, world),
                                lambda images, texts: pairs(texts, images),
                                min(k, n_texts), max(1, batch_size // min(k, n_texts)), device)
    finally:
        engine.train()
    metrics = {**_recalls("t2i", _gather_in_query_order(t2i, n_texts, world)),
               **_recalls("i2t", _gather_in_query_order(i2t, n_images, world))}
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    metrics.update(chance_levels(data.text_image, n_images))
    return metrics


def chance_levels(text_image: Tensor, n_images: int) -> dict[str, float]:
    """R@1 (percent) of a random ranking: a text has one true image among n_images; an image's
    true texts are its own captions among all texts (on average also 100 / n_images)."""
    n_texts = len(text_image)
    captions = torch.bincount(text_image, minlength=n_images).double()  # [I] texts per image
    return {"t2i_r1_chance": 100.0 / n_images,
            "i2t_r1_chance": 100.0 * (captions / n_texts).mean().item()}
