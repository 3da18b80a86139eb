"""Deterministic, resumable, world-size-invariant batch streams for one task.

The global batch of one optimizer step is made of `n_streams = world x accum`
micro-batches, one from each *stream*; rank r reads streams r*accum ..
r*accum+accum-1, one per micro-step. A stream is served by `parts` *readers*
(one per DataLoader worker, at least one), taking turns batch by batch; reader
`stream * parts + part` owns 1/(n_streams*parts) of each epoch (data/sources.py).
So the samples, masks and negatives of a step depend on the seed, the global
batch and `parts`, never on how the streams are spread over processes: one
process with accumulation 2 sees what two processes without accumulation see.

A reader reads a *block* of raw samples (about `shuffle_buffer`), shuffles it
with an RNG keyed by (seed, task, reader, epoch, block) and cuts it into
batches: fixed sizes from `batch_schedule` (equal batch counts on every reader,
every sample once per epoch) or token-budget buckets. Its *position* after a
batch is (epoch, batch index, block start cursor, batches used of the block):
a resumed reader re-opens the shard at the block's byte offset, rebuilds the
block and continues with exactly the batches the uninterrupted run would have
given. Picture shards with several captions per picture are read as (picture,
caption) pairs (data/sources.py): a block holds pairs, a picture is decoded once per
block however many of its pairs the block holds, and each pair is augmented on its own
in collate. Bad input never stops a reader (docs/data.md, "Bad and hostile input"): skips are counted by reason
and travel with the batches, also out of DataLoader workers.
"""
from __future__ import annotations

import functools
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batching import SIZE_MULTIPLE, batch_schedule, batches_per_epoch, token_buckets
from data.limits import DecodeLimits
from data.shards import (PAIR_MARK, RegionSample, decode_pixel_sample, decode_region_sample, iter_shard,
                         picture_key, pixel_pairs)
from data.sources import CORRUPT_SHARD_ERRORS, DatasetShards, MixedSource, NoUsableData, ShardSource, reader_share
from data.storage import NotARegularFile, S3Options

Collate = Callable[[list, np.random.Generator], dict]
log = logging.getLogger(__name__)


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    """Add per-reason counts into `total` (skips, retries)."""
    for reason, n in more.items():
        total[reason] = total.get(reason, 0) + int(n)


BAD_SHARD_WARNING = {"corrupt_tar": "skipping the rest of corrupt shard",
                     "missing_shard": "skipping missing shard",
                     "not_a_file": "skipping shard that is not a regular file:",
                     "sha256_mismatch": "skipping shard with a wrong checksum:",
                     "manifest_mismatch": "the manifest does not match shard"}


def stable_id(name: str) -> int:
    """A seed component from a name that is the same in every process and run."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class StreamSpec:
    """What a task's readers read and how they batch."""

    datasets: tuple[DatasetShards, ...]
    """One dataset, or several mixed sample by sample by their weights."""
    task: str
    seed: int
    n_streams: int
    batch_size: int
    shuffle_buffer: int
    max_txt_len: int
    img_dim: int
    parts: int = 1
    """Readers per stream (= DataLoader workers, at least 1)."""
    resampled: bool = False
    """Draw shards with replacement instead of cycling through each epoch."""
    token_budget: int = 0
    """> 0: token-budget batches (max length x size <= budget, multiples of 8) instead of fixed sizes."""
    s3: Optional[S3Options] = None
    epochs: Optional[int] = None
    """Stop after this many epochs (None: forever; training is driven by steps)."""
    modality: str = "regions"
    """"regions" (UNITER's region features, decoded to RegionSamples) or "pixels" (pictures,
    decoded to PixelSamples that collate augments)."""
    limits: DecodeLimits = DecodeLimits()
    """What one sample may cost and hold (DataConfig.decode_limits); beyond it, it is skipped."""
    verify_sha256: bool = False
    """Check each shard's sha256 against its manifest before reading it (data.verify_sha256)."""

    def __post_init__(self) -> None:
        if self.parts < 1 or self.n_streams < 1 or self.batch_size < 1:
            raise ValueError("parts, n_streams and batch_size must be >= 1")
        if self.token_budget < 0:
            raise ValueError(f"data.uniter.token_budget must be >= 0, got {self.token_budget}")
        if self.modality not in ("regions", "pixels"):
            raise ValueError(f"modality must be 'regions' or 'pixels', got {self.modality!r}")
        if self.modality == "pixels" and self.token_budget:
            raise ValueError("token-budget batches need region counts; pixel batches have a fixed size")

    def decode(self, raw: dict, tokenizer, pictures: Optional[dict] = None) -> tuple[Optional[object], Optional[str]]:
        """(sample, None) or (None, skip reason) for one raw shard sample (or picture-caption pair);
        `pictures`: decoded pictures shared by the pairs of one block (decode_pixel_sample)."""
        if self.modality == "pixels":
            return decode_pixel_sample(raw, tokenizer, self.limits, pictures)
        return decode_region_sample(raw, tokenizer, self.max_txt_len, self.img_dim, limits=self.limits)

    def pairs(self) -> Optional[Callable[[dict], Optional[int]]]:
        """How a reader counts the (picture, caption) pairs of a raw sample; None: one unit each."""
        return functools.partial(pixel_pairs, max_captions=self.limits.max_captions) \
            if self.modality == "pixels" else None

    @property
    def n_readers(self) -> int:
        return self.n_streams * self.parts

    @property
    def mixed(self) -> bool:
        return len(self.datasets) > 1

    @property
    def total_samples(self) -> int:
        return sum(d.num_samples for d in self.datasets)

    def name_id(self, ds: DatasetShards) -> int:
        """Seed component of a dataset's shard order (its task key alone when unmixed)."""
        return stable_id(self.task if not self.mixed else f"{self.task}@{ds.name}")

    def epoch_batches(self) -> int:
        """Batches every reader yields per epoch with fixed-size batches."""
        most = -(-self.total_samples // self.n_readers)
        return batches_per_epoch(most, self.batch_size)


def single_dataset(name: str, shards: Sequence[str], counts: Sequence[int]) -> tuple[DatasetShards, ...]:
    return (DatasetShards(name, tuple(str(s) for s in shards), tuple(int(c) for c in counts)),)


@dataclass
class Block:
    """A shuffled group of samples cut into batches."""

    batches: list[list]
    raw_count: int
    """Raw samples read for it (good and bad)."""
    decoded: bool
    """True when `batches` hold decoded samples (token buckets), False for raw ones."""
    uses: Counter = field(default_factory=Counter)
    """Pairs of each multi-caption picture (picture_key) in the block not decoded yet."""
    pictures: dict = field(default_factory=dict)
    """Decoded pictures the block's remaining pairs still need: each picture is decoded once per
    block, and dropped after its last pair, so a block holds at most its distinct pictures."""

    def __post_init__(self) -> None:
        if not self.decoded:
            self.uses.update(picture_key(r) for batch in self.batches for r in batch if PAIR_MARK in r)


class StreamReader:
    """Yields (epoch, index, samples, position-after) batches of one reader.

    `samples` are RegionSamples (bad ones dropped). `take_counts()` returns what was
    skipped (by reason) and how many raw samples were read since its previous call.
    A block rebuilt on resume after some of its batches were used is not counted
    again: its counts went out with those batches.
    """

    def __init__(self, spec: StreamSpec, tokenizer, reader: int, position: Optional[dict] = None):
        if spec.total_samples < spec.n_readers:
            raise ValueError(
                f"task {spec.task!r}: {spec.total_samples} samples cannot feed {spec.n_readers} readers "
                f"(world x grad_accum x max(1, num_workers)); use more data or fewer readers")
        self.spec, self.tok, self.reader = spec, tokenizer, reader
        self.position = position
        self.retries: dict[str, int] = {}
        """S3 retries by reason, filled by the storage layer as they happen."""
        self._new_skips: dict[str, int] = {}
        self._new_seen = 0
        self._counting = True

    # ------------------------------------------------------------ counts
    def _count_skip(self, reason: str) -> None:
        if self._counting:
            add_counts(self._new_skips, {reason: 1})

    def _count_seen(self, n: int) -> None:
        if self._counting:
            self._new_seen += n

    def _on_bad_shard(self, url: str, reason: str, detail: str) -> None:
        if self._counting:
            log.warning("%s %s (task %s, reader %d): %s", BAD_SHARD_WARNING.get(reason, reason), url,
                        self.spec.task, self.reader, detail)
        self._count_skip(reason)

    def take_counts(self) -> tuple[dict[str, int], int, dict[str, int]]:
        """(skips by reason, raw samples read, S3 retries by reason) since the previous call."""
        out = (self._new_skips, self._new_seen, dict(self.retries))
        self._new_skips, self._new_seen = {}, 0
        self.retries.clear()
        return out

    # ------------------------------------------------------------ source
    def _source(self, state: Optional[dict]) -> Union[ShardSource, MixedSource]:
        spec = self.spec
        subs = [ShardSource(ds, seed=spec.seed, name_id=spec.name_id(ds), reader=self.reader,
                            n_readers=spec.n_readers, resampled=spec.resampled, cycle=spec.mixed,
                            s3=spec.s3, stats=self.retries, on_bad_shard=self._on_bad_shard,
                            state=(state["sources"][k] if spec.mixed else state) if state else None,
                            verify_sha256=spec.verify_sha256, max_member_bytes=spec.limits.max_member_bytes,
                            pairs=spec.pairs())
                for k, ds in enumerate(spec.datasets)]
        if not spec.mixed:
            return subs[0]
        return MixedSource(subs, [d.weight for d in spec.datasets], seed=spec.seed,
                           name_id=stable_id(spec.task), reader=self.reader, state=state)

    def _epoch_quota(self) -> int:
        """Raw samples of one epoch: this reader's exact share, or nominal when resampled/mixed."""
        spec = self.spec
        if spec.resampled or spec.mixed:
            return spec.epoch_batches() * spec.batch_size
        return reader_share(spec.total_samples, self.reader, spec.n_readers)

    # ------------------------------------------------------------ blocks
    def _decode(self, raw: dict, block: Optional[Block] = None) -> Optional[RegionSample]:
        pictures = block.pictures if block is not None and PAIR_MARK in raw else None
        sample, reason = self.spec.decode(raw, self.tok, pictures)
        if pictures is not None:
            key = picture_key(raw)
            block.uses[key] -= 1
            if block.uses[key] <= 0:
                pictures.pop(key, None)
        if sample is None:
            self._count_skip(reason)
        else:
            sample.dataset = raw.get("__dataset__", "")
        return sample

    def _read(self, source, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            raw = source.next()
            if raw is None:
                break
            out.append(raw)
        return out

    def _block_rng(self, epoch: int, block: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, stable_id(self.spec.task), self.reader, epoch, block, 1])

    def _fixed_block(self, source, sizes: list[int], rng) -> tuple[list[list], int]:
        raws = self._read(source, sum(sizes))
        if self.spec.shuffle_buffer > 1:
            rng.shuffle(raws)
        batches, at = [], 0
        for size in sizes:
            if at < len(raws):
                batches.append(raws[at:at + size])
            at += size
        return batches, len(raws)

    def _token_block(self, source, quota: int, rng) -> tuple[list[list], int]:
        """Decode ~shuffle_buffer raw samples (more until the good ones are a multiple of 8)."""
        raws = self._read(source, min(quota, max(self.spec.shuffle_buffer, SIZE_MULTIPLE)))
        self._count_seen(len(raws))
        good = [s for s in map(self._decode, raws) if s is not None]
        while len(good) % SIZE_MULTIPLE and len(raws) < quota:
            more = self._read(source, 1)
            if not more:
                break
            raws += more
            self._count_seen(1)
            good += [s for s in map(self._decode, more) if s is not None]
        rng.shuffle(good)
        lengths = [len(s.input_ids) + 2 + len(s.img_feat) for s in good]
        batches = [[good[i] for i in idx] for idx in token_buckets(lengths, self.spec.token_budget)]
        rng.shuffle(batches)
        return batches, len(raws)

    def _block(self, source, epoch: int, block: int, sizes: list[int], quota_left: int) -> Block:
        rng = self._block_rng(epoch, block)
        if self.spec.token_budget:
            return Block(*self._token_block(source, quota_left, rng), decoded=True)
        return Block(*self._fixed_block(source, sizes, rng), decoded=False)

    # ------------------------------------------------------------ batches
    def _samples_of(self, block: Block, batch: list) -> list:
        if block.decoded:
            return batch
        self._count_seen(len(batch))
        return [s for s in (self._decode(raw, block) for raw in batch) if s is not None]

    def batches(self) -> Iterator[tuple[int, int, list, dict]]:
        """(epoch, batch index in epoch, samples, position after this batch), epoch after epoch."""
        spec, pos = self.spec, self.position
        source = self._source(pos["source"] if pos else None)
        epoch = pos["epoch"] if pos else 0
        n_batches = spec.epoch_batches()
        while spec.epochs is None or epoch < spec.epochs:
            quota = self._epoch_quota()
            sizes = batch_schedule(quota, n_batches, spec.batch_size) if not spec.token_budget else []
            per_block = max(1, spec.shuffle_buffer // spec.batch_size)
            start = pos if pos and pos["epoch"] == epoch else {
                "epoch": epoch, "index": 0, "block": 0, "raw": 0, "source": source.state(), "in_block": 0}
            index, block_no, raw = start["index"], start["block"], start["raw"]
            skip, pos = start["in_block"], None
            while raw < quota and (spec.token_budget or index < len(sizes)):
                head = {"epoch": epoch, "index": index, "block": block_no, "raw": raw, "source": source.state()}
                self._counting = skip == 0
                block = self._block(source, epoch, block_no, sizes[index:index + per_block], quota - raw)
                self._counting = True
                if block.raw_count == 0:
                    break  # the source ended early (damaged shards, short manifest counts)
                for k, batch in enumerate(block.batches):
                    if k < skip:
                        continue
                    samples = self._samples_of(block, batch)
                    after = {**head, "in_block": k + 1}
                    if samples:  # a batch with only bad samples is left out
                        yield epoch, index + k, samples, after
                index, raw, block_no, skip = index + len(block.batches), raw + block.raw_count, block_no + 1, 0
            if isinstance(source, ShardSource) and not spec.resampled:
                source.start_epoch(epoch + 1)
            if index == 0:
                raise NoUsableData(f"reader {self.reader} of task {spec.task!r} read no samples in epoch {epoch}; "
                                 f"are its shards readable?")
            epoch += 1


class TaskBatches(IterableDataset):
    """The micro-batches of one rank for one task, collated, in step order.

    Output k (counting from the resume point) is micro-step k % A of step k // A, taken
    from stream `streams[k % A]` by its reader `(k // A) % parts`. With W = parts
    DataLoader workers, worker w produces outputs w, w+W, ...: the DataLoader's
    round-robin over workers then returns them in order, and each reader lives in
    exactly one worker.

    Each batch carries `data_skipped` ({reason: count}), `data_seen` (raw samples
    read) and `data_retries` (S3 retries by reason) since its reader's previous batch.
    """

    def __init__(self, spec: StreamSpec, tokenizer, collate: Collate, streams: Sequence[int],
                 state: Optional[dict] = None):
        self.spec, self.tok, self.collate = spec, tokenizer, collate
        self.streams = list(streams)
        self.state = check_state(state, spec, self.streams)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        assert workers in (1, self.spec.parts), (workers, self.spec.parts)
        first = self.state["steps"] * len(self.streams)
        readers: dict[int, tuple[StreamReader, Iterator]] = {}
        for k in range(first + worker, 2 ** 62, workers):
            step, micro = divmod(k, len(self.streams))
            rid = self.streams[micro] * self.spec.parts + step % self.spec.parts
            if rid not in readers:
                reader = StreamReader(self.spec, self.tok, rid, self.state["readers"].get(rid))
                readers[rid] = (reader, reader.batches())
            reader, it = readers[rid]
            try:
                epoch, index, samples, position = next(it)
            except StopIteration:  # finite epochs: every reader ends after the same batch count
                yield from _leftover_counts(r for r, _ in readers.values())
                return
            rng = np.random.default_rng([self.spec.seed, stable_id(self.spec.task), rid, epoch, index, 2])
            batch = self.collate(samples, rng)
            batch.update(stream=self.streams[micro], reader=rid, epoch=epoch, index=index, position=position)
            batch["data_skipped"], batch["data_seen"], batch["data_retries"] = reader.take_counts()
            batch["datasets"] = [s.dataset for s in samples]
            yield batch


def _leftover_counts(readers: Iterable[StreamReader]) -> Iterator[dict]:
    """Counts-only items for what finished readers counted after their last batch (a trailing
    batch of only bad samples); the loader adds them up and yields no batch for them."""
    for reader in readers:
        skipped, seen, retries = reader.take_counts()
        if skipped or seen or retries:
            yield {"counts_only": True, "data_skipped": skipped, "data_seen": seen, "data_retries": retries}


def check_state(state: Optional[dict], spec: StreamSpec, streams: Sequence[int]) -> dict:
    """A loader state for these streams: {"steps": micro-batches per stream used, "readers": {id: position}}."""
    if not state:
        return {"steps": 0, "readers": {}}
    if "readers" not in state or "steps" not in state:
        raise ValueError(f"task {spec.task!r}: the checkpoint's data positions {state} are from an older "
                         f"vlpt; start a new run_dir (or set train.resume=false)")
    readers = {int(r): p for r, p in state["readers"].items()}
    if state.get("n_readers", spec.n_readers) != spec.n_readers:
        raise ValueError(
            f"task {spec.task!r}: the checkpoint's data positions were taken with {state['n_readers']} readers, "
            f"this run has {spec.n_readers} (world x grad_accum x max(1, data.num_workers)); resume with the "
            f"same global batch and data.num_workers")
    steps = {int(s): int(n) for s, n in state["steps"].items()}
    mine = {steps.get(s, 0) for s in streams}
    if len(mine) != 1:
        raise ValueError(f"task {spec.task!r}: inconsistent data positions in the checkpoint: {steps}")
    return {"steps": mine.pop(), "readers": readers}


class ResumableTaskLoader:
    """Iterates a task's micro-batches and remembers each reader's position."""

    def __init__(self, dataset: TaskBatches, num_workers: int, seed: int = 0, pin_memory: bool = False):
        """`pin_memory`: the DataLoader's own thread pins each batch as it arrives (CUDA runs), so the
        step's copies to the GPU are asynchronous and do not pin on the training thread."""
        self.dataset, self.seed, self.pin_memory = dataset, seed, pin_memory
        if max(1, num_workers) != dataset.spec.parts:
            raise ValueError(f"{num_workers} DataLoader workers for streams of {dataset.spec.parts} readers; "
                             f"StreamSpec.parts must be max(1, num_workers)")
        self.num_workers = num_workers
        self.positions: dict[int, dict] = dict(dataset.state["readers"])
        self.steps: dict[int, int] = {s: dataset.state["steps"] for s in dataset.streams}
        self._it: Optional[Iterator[dict]] = None
        self.skip_counts: dict[str, int] = {}
        """Samples skipped by reason in the batches consumed through this loader."""
        self.seen = 0
        """Raw samples (good and bad) behind the batches consumed through this loader."""
        self.retries: dict[str, int] = {}
        """S3 retries by reason behind the batches consumed through this loader."""

    def _iterator(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.dataset)
        # An own generator: creating workers must not consume the global (dropout) RNG.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4, generator=torch.Generator().manual_seed(self.seed),
                            persistent_workers=False, pin_memory=self.pin_memory)
        return iter(loader)

    def next(self) -> dict:
        if self._it is None:
            self._it = self._iterator()
        batch = self._next_item()
        while True:
            add_counts(self.skip_counts, batch.pop("data_skipped", {}))
            self.seen += int(batch.pop("data_seen", 0))
            add_counts(self.retries, batch.pop("data_retries", {}))
            if not batch.get("counts_only"):
                break
            batch = self._next_item()
        self.positions[batch["reader"]] = batch.pop("position")
        self.steps[batch["stream"]] += 1
        return batch

    def _next_item(self) -> dict:
        try:
            return next(self._it)
        except NoUsableData as e:
            # Out of a DataLoader worker the message is the worker's whole traceback; its last
            # line is "<module>.NoUsableData: <message>".
            last = str(e).strip().splitlines()[-1]
            raise NoUsableData(last.split("NoUsableData: ", 1)[-1]) from None

    def __iter__(self) -> Iterator[dict]:
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def state_dict(self) -> dict:
        """Reader positions and per-stream batch counts. Taken between optimizer steps,
        when every stream of the rank has given the same number of batches."""
        assert len(set(self.steps.values())) == 1, f"state taken mid-step: {self.steps}"
        return {"n_readers": self.dataset.spec.n_readers,
                "steps": {str(s): n for s, n in sorted(self.steps.items())},
                "readers": {str(r): p for r, p in sorted(self.positions.items())}}


def merge_states(per_rank: Sequence[dict]) -> dict:
    """One task's loader state from the states of all ranks (each knows its own streams)."""
    out: dict = {"n_readers": None, "steps": {}, "readers": {}}
    for state in per_rank:
        out["n_readers"] = state["n_readers"]
        out["steps"].update(state["steps"])
        out["readers"].update(state["readers"])
    return out


def pin(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to `device` (non-blocking from pinned memory on CUDA).
    Tensors already on a GPU (retrieval's image tokens and text states) just move, if at all."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if device.type == "cuda" and v.device.type == "cpu":
                v = (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
            else:
                v = v.to(device)
        out[k] = v
    return out


def iter_split(shards: Sequence[str], s3: Optional[S3Options] = None, skipped: Optional[dict[str, int]] = None,
               max_member_bytes: int = DecodeLimits.max_member_bytes) -> Iterator[dict]:
    """Every raw sample of a held-out split in file order, with the training reader's policy:
    a damaged, missing or non-regular shard gives what it has and is counted into `skipped`
    ("corrupt_tar", "missing_shard", "not_a_file") with one warning; S3 errors past the retry
    budget still raise."""
    for url in shards:
        try:
            yield from iter_shard(url, s3=s3, max_member_bytes=max_member_bytes)
        except (*CORRUPT_SHARD_ERRORS, FileNotFoundError, NotARegularFile) as e:
            reason = ("missing_shard" if isinstance(e, FileNotFoundError) else
                      "not_a_file" if isinstance(e, NotARegularFile) else "corrupt_tar")
            log.warning("held-out data: %s %s: %s: %s", BAD_SHARD_WARNING[reason], url, type(e).__name__, e)
            if skipped is not None:
                add_counts(skipped, {reason: 1})


def validation_batches(shards: Sequence[str], tokenizer, collate: Collate, *, task: str, seed: int,
                       rank: int, world: int, batch_size: int, max_txt_len: int,
                       img_dim: int, s3: Optional[S3Options] = None, skipped: Optional[dict[str, int]] = None,
                       limits: DecodeLimits = DecodeLimits(), raws: Optional[list[dict]] = None) -> Iterator[dict]:
    """The held-out split for one rank, in file order, with fixed per-batch RNG.

    Rank r takes samples r, r+world, ... of the first world*(n//world) samples, so
    every rank runs the same number of batches (collectives inside the model, as
    under ZeRO-3, cannot hang) and each kept sample is seen exactly once.
    Skips are counted into `skipped` by reason, so that their sum over ranks is the
    split's: shard-level ones by rank 0 (every rank reads every shard), bad samples by
    the rank they fall to. `raws`: the split already read (iter_split), else it is read here.
    """
    rank_skipped: dict[str, int] = {}
    if raws is None:
        raws = list(iter_split(shards, s3, rank_skipped, limits.max_member_bytes))
    if skipped is not None and rank == 0:
        add_counts(skipped, rank_skipped)
    usable = len(raws) // world * world
    mine = raws[rank:usable:world]
    for index, start in enumerate(range(0, len(mine), batch_size)):
        samples = []
        for raw in mine[start:start + batch_size]:
            sample, reason = decode_region_sample(raw, tokenizer, max_txt_len, img_dim, limits=limits)
            if sample is not None:
                samples.append(sample)
            elif skipped is not None:
                add_counts(skipped, {reason: 1})
        if samples:
            yield collate(samples, np.random.default_rng([seed, stable_id(task), index, 3]))
