"""Deterministic, resumable, world-size-invariant micro-batches of a downstream task.

A task's examples are few (VQA: 443k questions) and small, so they are held in memory; their
region features are read by image id from a FeatureStore. As for pretraining (data/loader.py),
the global batch of one optimizer step is `n_streams = world x accum` micro-batches, one per
stream; rank r reads streams r*accum .. r*accum+accum-1. Each epoch is a permutation of the
items keyed by (seed, task, epoch); step s of stream j takes the j-th slice of the s-th global
batch, and its collate RNG is keyed by (seed, task, epoch, s, j). So a step's batches depend on
the seed and the global batch only, and the position is one number: steps done.

Bad input never stops the loader (docs/downstream.md): an example whose image is missing or
unusable, or whose RE target is not a region of its image, is dropped from its batch and counted;
a micro-batch left empty takes the next usable items of the epoch order.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from data.loader import add_counts, stable_id
from data.sources import NoUsableData
from data.tasks.features import FeatureStore, Regions
from data.tasks.records import image_ids_of

Collate = Callable[[list, np.random.Generator], dict]


def join_regions(example: dict, store: FeatureStore) -> tuple[Optional[list[Regions]], Optional[str]]:
    """The Regions of each image the example names, or (None, why it cannot be used)."""
    images = []
    for image_id in image_ids_of(example):
        regions, reason = store.get(image_id)
        if reason:
            return None, reason
        images.append(regions)
    target = example.get("target")
    if target is not None and isinstance(images[0], Regions) and target >= images[0].num_bb:
        return None, "bad_label"  # RE on region features: the referred box is not a region (pictures have none)
    return images, None


def known_images(items: Sequence[dict], store: FeatureStore, skipped: dict[str, int]) -> list[dict]:
    """The items whose images the store indexes; the others are counted as "unknown_image"."""
    kept = [r for r in items if all(i in store.index for i in image_ids_of(r))]
    if len(kept) < len(items):
        add_counts(skipped, {"unknown_image": len(items) - len(kept)})
    return kept


class DownstreamLoader:
    """Micro-batches of this rank's streams, in order, then the next step's."""

    def __init__(self, items: list[dict], store: FeatureStore, collate: Collate, *, key: str, seed: int,
                 n_streams: int, micro_batch: int, streams: Sequence[int], steps_done: int = 0) -> None:
        self.items, self.store, self.collate, self.key, self.seed = items, store, collate, key, seed
        self.n_streams, self.micro_batch, self.streams = n_streams, micro_batch, list(streams)
        self.steps_per_epoch = len(items) // (n_streams * micro_batch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"task {key!r}: {len(items)} usable examples cannot fill one global batch of "
                             f"{n_streams * micro_batch} (world x grad_accum x data.micro_batch_size); use more "
                             "data or a smaller batch")
        self.steps_done, self._next_stream = steps_done, 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1
        self.skip_counts: dict[str, int] = {}
        self.seen = 0
        self.retries: dict[str, int] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, stable_id(self.key), epoch])
            self._order, self._order_epoch = rng.permutation(len(self.items)), epoch
        return self._order

    def next(self) -> dict:
        stream = self.streams[self._next_stream]
        epoch, step = divmod(self.steps_done, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = (step * self.n_streams + stream) * self.micro_batch
        samples = self._usable(order, start)
        rng = np.random.default_rng([self.seed, stable_id(self.key), epoch, step, stream])
        batch = self.collate(samples, rng)
        batch["stream"] = stream  # what seeds a recipe's own draws (ALBEF's negatives), as pretraining's loader
        self._next_stream += 1
        if self._next_stream == len(self.streams):
            self._next_stream, self.steps_done = 0, self.steps_done + 1
        return batch

    def _usable(self, order: np.ndarray, start: int) -> list[tuple[dict, list[Regions]]]:
        """The slice's usable (example, regions); past an all-bad slice, the next usable items."""
        samples: list[tuple[dict, list[Regions]]] = []
        n = len(self.items)
        for t in range(n):
            if t >= self.micro_batch and samples:
                break
            example = self.items[order[(start + t) % n]]
            self.seen += 1
            images, reason = join_regions(example, self.store)
            if reason:
                add_counts(self.skip_counts, {reason: 1})
            else:
                samples.append((example, images))
        if not samples:
            raise NoUsableData(f"task {self.key!r}: none of the {n} examples has usable region features")
        return samples

    def state_dict(self) -> dict:
        """The position in the format data/loader.py's merge_states joins over ranks."""
        assert self._next_stream == 0, "state taken mid-step"
        return {"n_readers": self.n_streams, "steps": {str(s): self.steps_done for s in self.streams},
                "readers": {}}


def steps_from_state(state: Optional[dict], key: str, n_streams: int, streams: Sequence[int]) -> int:
    """Optimizer steps a checkpoint's loader state records for these streams (0 without one)."""
    if not state:
        return 0
    if state.get("n_readers") != n_streams:
        raise ValueError(f"task {key!r}: the checkpoint's data positions were taken with {state.get('n_readers')} "
                         f"streams, this run has {n_streams} (world x grad_accum); resume with the same global "
                         "batch and data.micro_batch_size")
    steps = {int(state["steps"].get(str(s), -1)) for s in streams}
    if len(steps) != 1 or -1 in steps:
        raise ValueError(f"task {key!r}: inconsistent data positions in the checkpoint: {state['steps']}")
    return steps.pop()
