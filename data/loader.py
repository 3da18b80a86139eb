"""Deterministic, resumable, world-size-invariant batch streams for one task.

The global batch of one optimizer step is made of `n_streams = world x accum`
micro-batches, one from each *stream*. Stream `s` owns the shards
`shuffled(shards, seed, epoch)[s::n_streams]` (or, with fewer shards than
streams, every `n_streams`-th sample), its own seeded shuffle buffer and a
per-batch RNG keyed by (seed, task, stream, epoch, batch). Rank `r` reads
streams `r*accum .. r*accum+accum-1`, one per micro-step. So the samples, the
masking and the ITM negatives of a step do not depend on how the global batch
is split over processes: 1 process with accumulation 2 sees exactly what 2
processes without accumulation see.

Resume: a stream's position is (epoch, batches consumed in that epoch). The
trainer records it from the batches it actually consumed; a restarted stream
replays the same shard order and shuffle and skips that many batches without
decoding them.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import decode_region_sample, iter_shard

Collate = Callable[[list, np.random.Generator], dict]


def stable_id(name: str) -> int:
    """A seed component from a name that is the same in every process and run."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class StreamSpec:
    """What one stream reads and how it batches."""

    shards: tuple[str, ...]
    task: str
    seed: int
    n_streams: int
    batch_size: int
    shuffle_buffer: int
    max_txt_len: int
    img_dim: int


class StreamReader:
    """Yields (epoch, index, samples) micro-batches of one stream, forever."""

    def __init__(self, spec: StreamSpec, tokenizer, stream: int, epoch: int = 0, skip: int = 0):
        self.spec, self.tok, self.stream = spec, tokenizer, stream
        self.epoch, self.skip = epoch, skip
        self.skipped_samples: dict[str, int] = {}

    def _raw_samples(self, epoch: int) -> Iterator[dict]:
        spec = self.spec
        order = np.random.default_rng([spec.seed, stable_id(spec.task), epoch]).permutation(len(spec.shards))
        shards = [spec.shards[i] for i in order]
        if len(shards) >= spec.n_streams:
            for path in shards[self.stream::spec.n_streams]:
                yield from iter_shard(path)
            return
        # Fewer shards than streams: split by sample so every stream has data.
        i = 0
        for path in shards:
            for raw in iter_shard(path):
                if i % spec.n_streams == self.stream:
                    yield raw
                i += 1

    def _shuffled(self, epoch: int) -> Iterator[dict]:
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from self._raw_samples(epoch)
            return
        rng = np.random.default_rng([self.spec.seed, stable_id(self.spec.task), self.stream, epoch, 1])
        buf: list[dict] = []
        for raw in self._raw_samples(epoch):
            buf.append(raw)
            if len(buf) >= size:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, raw: dict):
        sample, reason = decode_region_sample(raw, self.tok, self.spec.max_txt_len, self.spec.img_dim)
        if sample is None:
            self.skipped_samples[reason] = self.skipped_samples.get(reason, 0) + 1
        return sample

    def batches(self) -> Iterator[tuple[int, int, list]]:
        """(epoch, batch index in epoch, decoded samples); the last partial batch is dropped."""
        epoch, skip = self.epoch, self.skip
        while True:
            index, pending = 0, []
            for raw in self._shuffled(epoch):
                pending.append(raw)
                if len(pending) < self.spec.batch_size:
                    continue
                if index >= skip:
                    samples = [s for s in map(self._decode, pending) if s is not None]
                    if samples:
                        yield epoch, index, samples
                index, pending = index + 1, []
            if index == 0:
                raise ValueError(
                    f"stream {self.stream} of task {self.spec.task!r} has fewer samples than one "
                    f"batch of {self.spec.batch_size}; use more data or a smaller micro_batch_size")
            epoch, skip = epoch + 1, 0


class TaskBatches(IterableDataset):
    """The micro-batches of one rank for one task: its streams in turn, collated.

    In a DataLoader with workers, worker w serves the rank's streams w, w+W, ...;
    the DataLoader's round-robin over workers then returns the streams in order.
    """

    def __init__(self, spec: StreamSpec, tokenizer, collate: Collate, streams: Sequence[int],
                 state: Optional[dict[int, tuple[int, int]]] = None):
        self.spec, self.tok, self.collate = spec, tokenizer, collate
        self.streams = list(streams)
        self.state = dict(state or {})

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.streams if info is None else self.streams[info.id::info.num_workers]
        readers = []
        for s in mine:
            epoch, skip = self.state.get(s, (0, 0))
            readers.append((s, StreamReader(self.spec, self.tok, s, epoch, skip).batches()))
        while True:
            for stream, it in readers:
                epoch, index, samples = next(it)
                rng = np.random.default_rng(
                    [self.spec.seed, stable_id(self.spec.task), stream, epoch, index, 2])
                batch = self.collate(samples, rng)
                batch["stream"], batch["epoch"], batch["index"] = stream, epoch, index
                yield batch


def usable_workers(requested: int, n_streams_on_rank: int) -> int:
    """Largest worker count <= requested that divides this rank's stream count,
    so the DataLoader's round-robin keeps the stream order."""
    for w in range(min(requested, n_streams_on_rank), 0, -1):
        if n_streams_on_rank % w == 0:
            return w
    return 0


class ResumableTaskLoader:
    """Iterates a task's micro-batches and remembers each stream's position."""

    def __init__(self, dataset: TaskBatches, num_workers: int, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.num_workers = usable_workers(num_workers, len(dataset.streams))
        self.positions: dict[int, tuple[int, int]] = dict(dataset.state)
        self._it: Optional[Iterator[dict]] = None
        self._consumed = 0

    def _iterator(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.dataset)
        # An own generator: creating workers must not consume the global (dropout) RNG.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4, generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def next(self) -> dict:
        if self._it is None:
            self._it = self._iterator()
        batch = next(self._it)
        self.positions[batch["stream"]] = (batch["epoch"], batch["index"] + 1)
        self._consumed += 1
        return batch

    def state_dict(self) -> dict:
        """Stream positions. Taken between optimizer steps, when every stream of the
        rank has given the same number of batches, so a restart may begin at stream 0."""
        assert self._consumed % len(self.dataset.streams) == 0, "state taken mid-step"
        return {str(s): list(pos) for s, pos in sorted(self.positions.items())}


def positions_from_state(state: Optional[dict]) -> dict[int, tuple[int, int]]:
    return {int(s): (int(e), int(i)) for s, (e, i) in (state or {}).items()}


def pin(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to `device` (non-blocking from pinned memory on CUDA)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if device.type == "cuda":
                v = v.pin_memory().to(device, non_blocking=True)
            else:
                v = v.to(device)
        out[k] = v
    return out


def validation_batches(shards: Sequence[str], tokenizer, collate: Collate, *, task: str, seed: int,
                       rank: int, world: int, batch_size: int, max_txt_len: int,
                       img_dim: int) -> Iterator[dict]:
    """The held-out split for one rank, in file order, with fixed per-batch RNG.

    Rank r takes samples r, r+world, ... of the first world*(n//world) samples, so
    every rank runs the same number of batches (collectives inside the model, as
    under ZeRO-3, cannot hang) and each kept sample is seen exactly once.
    """
    raws = [raw for path in shards for raw in iter_shard(path)]
    usable = len(raws) // world * world
    mine = raws[rank:usable:world]
    for index, start in enumerate(range(0, len(mine), batch_size)):
        decoded = [decode_region_sample(r, tokenizer, max_txt_len, img_dim)[0]
                   for r in mine[start:start + batch_size]]
        samples = [s for s in decoded if s is not None]
        if samples:
            yield collate(samples, np.random.default_rng([seed, stable_id(task), index, 3]))
