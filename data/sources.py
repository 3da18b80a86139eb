"""Raw-sample sources of one reader: which shards it reads, in which order, and where it is.

A *reader* is the unit that owns part of the data: one per (stream, DataLoader
worker). `ShardSource` gives a reader its share of one dataset:

- non-resampled: the epoch's shard order is a permutation drawn from
  (seed, name, epoch), the same in every process; the concatenated samples are
  cut into `n_readers` contiguous ranges of equal size (±1), so across all
  ranks and workers every sample is read exactly once per epoch, whatever the
  shard sizes (a reader may start or stop inside a shard);
- resampled: shard j of the reader is drawn with replacement from
  (seed, name, reader, j), for data too large or unequal to cycle through.

`MixedSource` interleaves several datasets' sources sample by sample with
given weights (draw i from (seed, name, reader, i // 1024)).

A source's `state()` is a small JSON-able cursor (segment, sample index and byte
offset of the next sample); a source built from it continues exactly there,
re-opening the shard at that byte (a ranged GET on S3), not from its start.

Picture shards of the vlpt-pixels-v2 layout hold one sample per picture with all
its captions. Their unit is the (picture, caption) pair: `pairs(raw)` says how many
a raw sample holds (data.shards.pixel_pairs), the manifest counts pairs per shard,
and everything above (ranges, cursors, epochs) counts pairs, so an epoch reads every
pair once, as it read every one-caption sample once. A cursor inside a picture's
captions keeps the byte offset of that picture's sample plus `base`, the pair index
its first caption has; the sample is read again on resume.

A shard that cannot be read as listed never stops a reader: it is skipped or read as far
as it goes, and reported through `on_bad_shard(url, reason, detail)` with a reason of
data.shards.SHARD_SKIP_REASONS, once per shard and epoch by the reader that meets it.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from data.limits import DEFAULT_MAX_MEMBER_BYTES
from data.shards import Manifest, iter_shard, pair_of
from data.storage import NotARegularFile, S3Options, object_size, sha256_of

CORRUPT_SHARD_ERRORS = (tarfile.TarError, EOFError)
"""What a damaged or truncated tar raises; network failures past the retry budget are not among them."""
DRAW_CHUNK = 1024


class NoUsableData(ValueError):
    """A reader found nothing it can read (every shard missing, damaged or skipped): not a bad
    sample to count but a dataset to fix; the run stops with one line."""


@dataclass(frozen=True)
class DatasetShards:
    """One dataset as a reader sees it: shard URLs with their manifest counts of what a reader
    reads one by one (samples; (picture, caption) pairs for picture shards)."""

    name: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    weight: float = 1.0
    sizes: tuple[Optional[int], ...] = ()
    """Bytes of each shard per the manifest, checked when read; empty: not checked."""
    sha256: tuple[str, ...] = ()
    """Hex checksums per the manifest, checked when the reader verifies; empty: none known."""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_manifest(cls, name: str, manifest: Manifest, weight: float = 1.0) -> "DatasetShards":
        return cls(name, tuple(manifest.shards), tuple(manifest.units), weight,
                   tuple(manifest.sizes), tuple(manifest.sha256))


def epoch_shard_order(n_shards: int, seed: int, name_id: int, epoch: int) -> np.ndarray:
    """The shard permutation of an epoch: a function of the seed only, never of the rank."""
    return np.random.default_rng([seed, name_id, epoch]).permutation(n_shards)


def epoch_segments(ds: DatasetShards, seed: int, name_id: int, epoch: int, reader: int,
                   n_readers: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample, end sample) pieces holding this reader's share of an epoch."""
    total = ds.num_samples
    lo, hi = reader * total // n_readers, (reader + 1) * total // n_readers
    segments, start = [], 0
    for i in epoch_shard_order(len(ds.shards), seed, name_id, epoch):
        count = ds.counts[i]
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            segments.append((int(i), a - start, b - start))
        start += count
    return segments


def reader_share(total: int, reader: int, n_readers: int) -> int:
    return (reader + 1) * total // n_readers - reader * total // n_readers


class ShardSource:
    """One dataset's raw samples for one reader, as a resumable cursor.

    `next()` returns the next raw sample, or None at the end of a non-resampled
    epoch when `cycle` is False (the caller starts the next with `start_epoch`).
    With `pairs` (picture shards), a raw sample for which it gives n is returned as n
    pairs (data.shards.pair_of), one by one; None means a one-caption sample.
    `on_bad_shard(url, reason, detail)` is called once per damaged, missing or
    mismatching shard (see the module doc): for damage and a short shard by the
    reader whose range holds the place, for a missing or refused shard by every
    reader that needed it, for a size or checksum mismatch by the reader that
    starts the shard.
    """

    def __init__(self, ds: DatasetShards, *, seed: int, name_id: int, reader: int, n_readers: int,
                 resampled: bool, cycle: bool, s3: Optional[S3Options], stats: dict,
                 on_bad_shard: Callable[[str, str, str], None], state: Optional[dict] = None,
                 verify_sha256: bool = False, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 pairs: Optional[Callable[[dict], Optional[int]]] = None):
        if not ds.shards:
            raise ValueError(f"dataset {ds.name!r} has no shards")
        self.ds, self.seed, self.name_id = ds, seed, name_id
        self.reader, self.n_readers = reader, n_readers
        self.resampled, self.cycle, self.s3, self.stats = resampled, cycle, s3, stats
        self.on_bad_shard = on_bad_shard
        self.verify_sha256, self.max_member_bytes, self.pairs = verify_sha256, max_member_bytes, pairs
        self._checksums: dict[int, bool] = {}
        self._draws: dict[int, np.ndarray] = {}
        self._it: Optional[Iterator[dict]] = None
        if state is None:
            self.start_epoch(0)
        else:
            self.epoch, self.seg = int(state["epoch"]), int(state["seg"])
            self.sample, self.offset = int(state["sample"]), int(state["offset"])
            self.base = int(state.get("base", self.sample))
            self._segments = self._plan(self.epoch)

    def state(self) -> dict:
        state = {"epoch": self.epoch, "seg": self.seg, "sample": self.sample, "offset": self.offset}
        if self.base != self.sample:  # inside a picture's captions
            state["base"] = self.base
        return state

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self._segments = epoch, self._plan(epoch)
        self._enter(0)
        self._it = None

    def _plan(self, epoch: int) -> list[tuple[int, int, int]]:
        if self.resampled:
            return []  # segments are drawn on demand
        return epoch_segments(self.ds, self.seed, self.name_id, epoch, self.reader, self.n_readers)

    def _segment(self, j: int) -> Optional[tuple[int, int, int]]:
        if not self.resampled:
            return self._segments[j] if j < len(self._segments) else None
        chunk = j // DRAW_CHUNK
        if chunk not in self._draws:
            self._draws = {chunk: np.random.default_rng(
                [self.seed, self.name_id, self.reader, 5, chunk]).integers(len(self.ds.shards), size=DRAW_CHUNK)}
        i = int(self._draws[chunk][j % DRAW_CHUNK])
        return i, 0, self.ds.counts[i]

    def _enter(self, j: int) -> None:
        segment = self._segment(j)
        self.seg, self.sample, self.offset = j, (segment[1] if segment else 0), -1
        self.base = self.sample

    def _read_segment(self) -> Iterator[dict]:
        """From the cursor to the segment's end; advances the cursor past each sample (pair)."""
        shard, first, end = self._segment(self.seg)
        url = self.ds.shards[shard]
        known = self.offset >= 0
        index, start = (self.base if known else 0), self.sample  # index: of the next raw sample's first pair
        try:
            if not known and not self._shard_usable(shard, report=first == 0):
                return
            raws = iter_shard(url, self.offset if known else 0, self.s3, self.stats, self.max_member_bytes)
            for raw in raws:
                if index >= end:
                    return
                n = self.pairs(raw) if self.pairs else None
                at, index = index, index + (n or 1)
                if index >= end == self.ds.counts[shard]:
                    self._check_shard_ends(url, raws, end, index)
                raw["__dataset__"] = self.ds.name
                for unit in range(max(at, start), min(index, end)):
                    inside = unit + 1 < index  # more of this picture's captions follow
                    self.sample, self.base = unit + 1, (at if inside else index)
                    self.offset = raw["__offset__"] if inside else raw["__end__"]
                    yield raw if n is None else pair_of(raw, unit - at)
        except CORRUPT_SHARD_ERRORS as e:
            if index >= first:  # the damage lies in this reader's range: it alone reports it
                self.on_bad_shard(url, "corrupt_tar", f"{type(e).__name__}: {e}")
            return
        except FileNotFoundError as e:
            self.on_bad_shard(url, "missing_shard", str(e))
            return
        except NotARegularFile as e:
            self.on_bad_shard(url, "not_a_file", str(e))
            return
        if first <= index < end:  # it ended inside this reader's range: fewer samples than listed
            self.on_bad_shard(url, "manifest_mismatch", f"it holds {index} samples, its manifest lists "
                              f"{self.ds.counts[shard]}")

    def _check_shard_ends(self, url: str, raws: Iterator[dict], listed: int, read: int) -> None:
        """Reads ahead one sample past the manifest's last: there must be none (and the last must
        not hold more pairs than listed: `read` pairs so far)."""
        if read > listed:
            self.on_bad_shard(url, "manifest_mismatch", f"it holds more than the {listed} pairs its "
                              f"manifest lists; the rest is not read")
            return
        try:
            extra = next(raws, None)
        except CORRUPT_SHARD_ERRORS as e:  # damage after the last listed sample
            self.on_bad_shard(url, "corrupt_tar", f"{type(e).__name__}: {e}")
            return
        if extra is not None:
            self.on_bad_shard(url, "manifest_mismatch", f"it holds more than the {listed} samples its "
                              f"manifest lists; the rest is not read")

    def _shard_usable(self, shard: int, report: bool) -> bool:
        """Before a segment: the shard's size (a mismatch is reported, the shard still read)
        and, when verifying, its checksum (a mismatch skips it). `report`: this reader starts
        the shard, so it alone reports (every reader still skips a bad checksum)."""
        url = self.ds.shards[shard]
        expected = self.ds.sizes[shard] if shard < len(self.ds.sizes) else None
        if report and expected is not None:
            size = object_size(url, self.s3, self.stats)
            if size != expected:
                self.on_bad_shard(url, "manifest_mismatch", f"it has {size} bytes, its manifest lists {expected}")
        if not self.verify_sha256 or shard >= len(self.ds.sha256):
            return True
        if shard not in self._checksums:  # a shard is hashed once per reader, not once per epoch
            self._checksums[shard] = sha256_of(url, self.s3, self.stats) == self.ds.sha256[shard]
        if report and not self._checksums[shard]:
            self.on_bad_shard(url, "sha256_mismatch", "its sha256 differs from the manifest's; skipped")
        return self._checksums[shard]

    def _samples(self) -> Iterator[dict]:
        empty = 0  # segments in a row that gave nothing: all shards unreadable would spin forever
        while True:
            if self._segment(self.seg) is None:
                if not self.cycle:
                    return
                self.start_epoch(self.epoch + 1)
                if not self._segments:
                    raise NoUsableData(f"dataset {self.ds.name!r} gives reader {self.reader} no samples")
                continue
            before = self.sample, self.offset
            yield from self._read_segment()
            empty = empty + 1 if (self.sample, self.offset) == before else 0
            if empty > 2 * len(self.ds.shards) + 8:
                raise NoUsableData(f"dataset {self.ds.name!r}: reader {self.reader} found no readable sample in "
                                 f"{empty} shard reads in a row; are its shards there and intact?")
            self._enter(self.seg + 1)

    def next(self) -> Optional[dict]:
        if self._it is None:
            self._it = self._samples()
        return next(self._it, None)


class MixedSource:
    """Several sources interleaved sample by sample, dataset i drawn with probability ∝ weight_i."""

    def __init__(self, sources: Sequence[ShardSource], weights: Sequence[float], *, seed: int,
                 name_id: int, reader: int, state: Optional[dict] = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError("MixedSource needs one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError(f"dataset weights must be >= 0 and not all 0, got {list(weights)}")
        self.sources, self.p = list(sources), w / w.sum()
        self.key = [seed, name_id, reader, 4]
        self.draws = int(state["draws"]) if state else 0
        self._chunk: tuple[int, np.ndarray] = (-1, np.empty(0))

    def state(self) -> dict:
        return {"draws": self.draws, "sources": [s.state() for s in self.sources]}

    def next(self) -> Optional[dict]:
        chunk = self.draws // DRAW_CHUNK
        if self._chunk[0] != chunk:
            rng = np.random.default_rng(self.key + [chunk])
            self._chunk = (chunk, rng.choice(len(self.sources), size=DRAW_CHUNK, p=self.p))
        pick = int(self._chunk[1][self.draws % DRAW_CHUNK])
        self.draws += 1
        return self.sources[pick].next()
