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

import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import decode_region_sample, iter_shard

Collate = Callable[[list, np.random.Generator], dict]
log = logging.getLogger(__name__)
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError)


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
    """Yields (epoch, index, samples) micro-batches of one stream, forever.

    Bad input never stops it (DESIGN §5): undecodable samples are dropped and a
    corrupt or truncated shard is abandoned at the damage (the complete samples
    before it are used), each counted by reason. `take_counts()` returns what was
    skipped and how many raw samples were decoded since its previous call, so the
    counts can travel with each batch (also out of DataLoader workers). Batches
    skipped on resume are neither decoded nor counted again.
    """

    def __init__(self, spec: StreamSpec, tokenizer, stream: int, epoch: int = 0, skip: int = 0):
        self.spec, self.tok, self.stream = spec, tokenizer, stream
        self.epoch, self.skip = epoch, skip
        self._new_skips: dict[str, int] = {}
        self._new_seen = 0
        self._counting = True

    def _count_skip(self, reason: str) -> None:
        if not self._counting:
            return
        self._new_skips[reason] = self._new_skips.get(reason, 0) + 1

    def take_counts(self) -> tuple[dict[str, int], int]:
        """(skips by reason, raw samples decoded) since the previous call."""
        out = (self._new_skips, self._new_seen)
        self._new_skips, self._new_seen = {}, 0
        return out

    def _read_shard(self, path: str, count: bool = True) -> Iterator[dict]:
        """iter_shard(path), ending quietly at damage; `count`: this stream reports it."""
        try:
            yield from iter_shard(path)
        except SHARD_READ_ERRORS as e:
            if count and self._counting:
                log.warning("skipping the rest of corrupt shard %s (task %s, stream %d): %s: %s",
                            path, self.spec.task, self.stream, type(e).__name__, e)
                self._count_skip("corrupt_tar")

    def _raw_samples(self, epoch: int) -> Iterator[dict]:
        spec = self.spec
        order = np.random.default_rng([spec.seed, stable_id(spec.task), epoch]).permutation(len(spec.shards))
        shards = [spec.shards[i] for i in order]
        if len(shards) >= spec.n_streams:
            for path in shards[self.stream::spec.n_streams]:
                yield from self._read_shard(path)
            return
        # Fewer shards than streams: split by sample so every stream has data.
        # Every stream reads every shard; stream 0 alone reports a corrupt one.
        i = 0
        for path in shards:
            for raw in self._read_shard(path, count=self.stream == 0):
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
            self._count_skip(reason)
        return sample

    def batches(self) -> Iterator[tuple[int, int, list]]:
        """(epoch, batch index in epoch, decoded samples); the last partial batch is dropped."""
        epoch, skip = self.epoch, self.skip
        while True:
            index, pending = 0, []
            self._counting = index >= skip
            for raw in self._shuffled(epoch):
                pending.append(raw)
                if len(pending) < self.spec.batch_size:
                    continue
                if index >= skip:
                    self._new_seen += len(pending)
                    samples = [s for s in map(self._decode, pending) if s is not None]
                    if samples:
                        yield epoch, index, samples
                index, pending = index + 1, []
                self._counting = index >= skip
            if index == 0:
                raise ValueError(
                    f"stream {self.stream} of task {self.spec.task!r} has fewer samples than one "
                    f"batch of {self.spec.batch_size}; use more data or a smaller micro_batch_size")
            epoch, skip = epoch + 1, 0


class TaskBatches(IterableDataset):
    """The micro-batches of one rank for one task: its streams in turn, collated.

    In a DataLoader with workers, worker w serves the rank's streams w, w+W, ...;
    the DataLoader's round-robin over workers then returns the streams in order.

    Each batch carries `data_skipped` ({reason: count}) and `data_seen` (raw samples
    decoded, good and bad) since its stream's previous batch.
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
            reader = StreamReader(self.spec, self.tok, s, epoch, skip)
            readers.append((s, reader, reader.batches()))
        while True:
            for stream, reader, it in readers:
                epoch, index, samples = next(it)
                rng = np.random.default_rng(
                    [self.spec.seed, stable_id(self.spec.task), stream, epoch, index, 2])
                batch = self.collate(samples, rng)
                batch["stream"], batch["epoch"], batch["index"] = stream, epoch, index
                batch["data_skipped"], batch["data_seen"] = reader.take_counts()
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
        self.skip_counts: dict[str, int] = {}
        """Samples skipped by reason in the batches consumed through this loader."""
        self.seen = 0
        """Raw samples (good and bad) behind the batches consumed through this loader."""

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
        for reason, n in batch.pop("data_skipped", {}).items():
            self.skip_counts[reason] = self.skip_counts.get(reason, 0) + int(n)
        self.seen += int(batch.pop("data_seen", 0))
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
