"""Hard-negative retrieval batches (docs/downstream.md, "Hard negatives"), UNITER's
`UniterForImageTextRetrievalHardNeg` data: per query caption t of image I, a text-side block
[(t, I), (t, I_1), ..., (t, I_C)] of C random other images and an image-side block
[(t, I), (t_1, I), ..., (t_C, I)] of C random captions of other images, drawn from the whole training
split (the pool), not only the micro-batch. The objective scores every row without gradient and keeps
the positive plus the `hard_size` highest-scoring negatives of each block (trainer/objectives/downstream.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data.tasks.collate import Sample, _check_batch, _layout, _words
from data.tasks.features import FeatureStore, Regions


@dataclass
class CandidatePool:
    """The training split the negatives are drawn from: its captions and their images' features."""

    examples: list[dict]
    store: FeatureStore

    def __post_init__(self) -> None:
        self.image_ids = list(dict.fromkeys(r["image_id"] for r in self.examples))


def _draw(n: int, k: int, rng: np.random.Generator, keep) -> list[int]:
    """Up to k distinct indices of range(n) that `keep` accepts, in draw order (a few redraws, as
    UNITER redraws a sample that hits the query's own image)."""
    picked: list[int] = []
    for j in rng.permutation(n):
        if len(picked) == k:
            break
        if keep(int(j)):
            picked.append(int(j))
    return picked


def _query_rows(ex: dict, own: Regions, pool: CandidatePool, rng: np.random.Generator,
                candidates: int) -> tuple[list[dict], list[Regions]]:
    """The text-side then the image-side block of one query: (caption, regions) per row."""
    image = ex["image_id"]
    regions: dict[int, Regions] = {}

    def usable_image(j: int) -> bool:
        if pool.image_ids[j] == image:
            return False
        found, _ = pool.store.get(pool.image_ids[j])  # a bad image is never a candidate
        if found is not None:
            regions[j] = found
        return found is not None

    images = _draw(len(pool.image_ids), candidates, rng, usable_image)
    captions = _draw(len(pool.examples), candidates, rng, lambda j: pool.examples[j]["image_id"] != image)
    if len(images) < candidates or len(captions) < candidates:
        raise ValueError(f"hard-negative retrieval draws {candidates} other images and captions per caption "
                         f"(finetune.hard_candidates) but the training split offers {len(images)} and "
                         f"{len(captions)}; lower finetune.hard_candidates")
    texts = [ex] * (1 + candidates) + [ex] + [pool.examples[j] for j in captions]
    pictures = [own] + [regions[j] for j in images] + [own] * (1 + candidates)
    return texts, pictures


def collate_retrieval_hard(samples: Sequence[Sample], rng: np.random.Generator, *, tok, max_txt_len: int,
                           pool: CandidatePool, candidates: int, hard_size: int) -> dict:
    """Rows: per query caption, its text-side block then its image-side block, each of 1 + C rows with the
    positive first. Adds `hard_group` (1 + C) and `hard_size` (negatives kept per block);
    n_items = 2 x queries x hard_size (the hinge terms of the kept rows)."""
    if not 1 <= hard_size <= candidates:
        raise ValueError(f"finetune.hard_negatives={hard_size} must be between 1 and finetune.hard_candidates="
                         f"{candidates}")
    _check_batch(samples, 1, max_txt_len)
    texts, pictures = [], []
    for ex, (own,) in samples:
        t, p = _query_rows(ex, own, pool, rng, candidates)
        texts += t
        pictures += p
    words = [_words(tok, r["text"], max_txt_len) for r in texts]
    batch = _layout(words, [r.img_feat for r in pictures], [r.img_pos for r in pictures], tok,
                    [ex["id"] for ex, _ in samples], "retrieval")
    batch["hard_group"] = 1 + candidates
    batch["hard_size"] = int(hard_size)
    batch["n_items"] = 2 * len(samples) * int(hard_size)
    return batch
