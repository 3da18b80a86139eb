"""What the region-format readers share: the record they produce, the reader protocol the shard builder
calls in its worker processes, bounded decoders (base64, msgpack / msgpack_numpy, lz4 frames, npz) and
the join of a captions file with the images a source holds.

Hostile input: every decoder is bounded by `MAX_RECORD_BYTES` (training's `data.max_member_bytes`
default) before it allocates, nothing is ever unpickled (msgpack_numpy's array dicts are decoded here,
numeric dtypes only), and a record that cannot be used raises `RecordError(reason)`, which the reader
turns into a skip counted by reason.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from data.builders import Entry, _id, _safe, build_region_record_shards, load_captions, region_layout
from data.limits import DEFAULT_MAX_MEMBER_BYTES
from data.shards import _read_npy

MAX_RECORD_BYTES = DEFAULT_MAX_MEMBER_BYTES
"""Most bytes one record (a TSV row, an LMDB value, its decompressed or decoded arrays) may take."""
MAX_BOXES = 10_000
"""More boxes than any detector keeps per image (UNITER: 10-100, detectron2's default: 1000)."""
LZ4_MAGIC = b"\x04\x22\x4d\x18"
NPZ_MAGIC = b"PK"
_NUMERIC_KINDS = "fiub"
RECORD_SKIP_REASONS = ("bad_record", "record_too_large", "too_many_boxes", "bad_image_size", "duplicate_image_id")
"""What the readers count besides data.builders' reasons (missing_field, no_regions, bad_shape, ...):
"bad_record" (a row or value that does not parse: bad base64, wrong byte lengths, bad msgpack / lz4 / npz,
a non-numeric or pickled array), "record_too_large" (over MAX_RECORD_BYTES, raw or inflated; never read
past it), "too_many_boxes" (over MAX_BOXES), "bad_image_size" (a width or height not finite and > 0),
"duplicate_image_id" (an image id met again in a TSV: the first row wins)."""
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError, EOFError,
                 zipfile.BadZipFile)
"""What malformed bytes raise in numpy, base64, msgpack, lz4 and zipfile: a bad record, not a bug."""


class RecordError(Exception):
    """A record that cannot be used: `reason` is its skip reason, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class RegionRecord:
    """One image's regions, as every format is read into."""

    image_id: str
    features: np.ndarray  # [n, D]
    norm_bb: np.ndarray  # [n, 6] x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h
    conf: Optional[np.ndarray] = None  # [n] detector confidence, when the source has it
    soft_labels: Optional[np.ndarray] = None  # [n, K] class distribution, when the source has it

    def arrays(self) -> dict[str, np.ndarray]:
        """The region arrays as the shard builder stores them (absent fields left out)."""
        out = {"features": self.features, "norm_bb": self.norm_bb}
        if self.conf is not None:
            out["conf"] = self.conf
        if self.soft_labels is not None:
            out["soft_labels"] = self.soft_labels
        return out


class RecordReader:
    """A source opened once per shard in a builder worker: `reader(entry)` -> (arrays, None) or
    (None, skip reason). Subclasses implement `read(entry) -> RegionRecord` (raising RecordError) and
    may keep open handles in `self.handles`, closed on exit. The class itself is what the builder
    pickles to its workers (`opener`), constructed there with the build's params."""

    def __init__(self, params: dict):
        self.params = params
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    def read(self, entry: Entry) -> RegionRecord:
        raise NotImplementedError

    def __call__(self, entry: Entry) -> tuple[Optional[dict], Optional[str]]:
        try:
            return self.read(entry).arrays(), None
        except RecordError as e:
            return None, e.reason
        except DECODE_ERRORS:  # malformed bytes fail in many ways; all mean the same here
            return None, "bad_record"


class LmdbRecordReader(RecordReader):
    """Reads the LMDB value of an entry (entry.locator: its key; entry.source: a file in the LMDB
    folder) into a RegionRecord: `to_record(key, decoded value)` with the value's `fields` decoded."""

    fields: tuple[str, ...] = ()

    def to_record(self, key: str, dump: dict[str, Any]) -> RegionRecord:
        raise NotImplementedError

    def read(self, entry: Entry) -> RegionRecord:
        if entry.source not in self.handles:
            self.handles[entry.source] = open_lmdb(Path(entry.source).parent)
        value = lmdb_value(self.handles[entry.source], entry.locator)
        return self.to_record(entry.locator, decode_value(value, self.fields))


# ---------------------------------------------------------------- boxes

def check_box_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise RecordError("bad_record", f"box count {n!r} is not an integer")
    if n < 1:
        raise RecordError("no_regions", f"{n} boxes")
    if n > MAX_BOXES:
        raise RecordError("too_many_boxes", f"{n} boxes, more than {MAX_BOXES}")
    return int(n)


def normalise_boxes(boxes: np.ndarray, width: Any, height: Any) -> np.ndarray:
    """UNITER's box features from pixel boxes [n, 4] (x1, y1, x2, y2) in a frame of `width` x `height`:
    [n, 6] x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h (the model appends their product)."""
    w, h = as_number(width, "width"), as_number(height, "height")
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise RecordError("bad_image_size", f"image size {width!r} x {height!r}")
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise RecordError("bad_shape", f"boxes of shape {b.shape}, expected [n, 4]")
    x1, y1, x2, y2 = b.T  # [n] each
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], axis=1).astype(np.float32)


def as_number(value: Any, what: str) -> float:
    """A finite-or-not real number from an int, float, numeric string, 0-d / 1-element array or
    msgpack_numpy scalar; RecordError otherwise."""
    if isinstance(value, dict):
        value = decode_ndarray(value)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise RecordError("bad_record", f"{what} is an array of {value.size} values")
        value = value.reshape(()).item()
    if isinstance(value, (bytes, str)):
        try:
            value = float(value)
        except ValueError:
            raise RecordError("bad_record", f"{what} {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError("bad_record", f"{what} {value!r} is not a number")
    return float(value)


# ---------------------------------------------------------------- bounded decoders

def b64_float32(text: str, n: int, width: Optional[int], what: str) -> np.ndarray:
    """A base64 field of float32 values as [n] (width None) or [n, width] (width -1: inferred)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError("bad_record", f"{what} is not base64") from None
    expected = 4 * n * (1 if width is None else max(width, 0))  # 0: any whole number of float32 rows
    if not data or len(data) % (4 * n) or (expected and len(data) != expected):
        raise RecordError("bad_record", f"{what}: {len(data)} bytes for {n} boxes")
    values = np.frombuffer(data, dtype="<f4")
    return values if width is None else values.reshape(n, -1 if width == -1 else width)


def lz4_decompress(data: bytes, max_bytes: Optional[int] = None) -> bytes:
    """One lz4 frame, refused once it would inflate beyond `max_bytes` (default MAX_RECORD_BYTES; a few
    bytes can declare GBs)."""
    import lz4.frame

    max_bytes = MAX_RECORD_BYTES if max_bytes is None else max_bytes
    decompressor = lz4.frame.LZ4FrameDecompressor()
    out = decompressor.decompress(data, max_length=max_bytes)
    if not decompressor.eof:
        if len(out) >= max_bytes:
            raise RecordError("record_too_large", f"lz4 frame inflates beyond {max_bytes} bytes")
        raise RecordError("bad_record", "truncated lz4 frame")
    return out


def unpack_msgpack(data: bytes) -> Any:
    """msgpack as UNITER writes it (use_bin_type=True; str keys, bytes for bin); the unpacker's
    lengths are bounded by the buffer, its nesting by its own stack limit."""
    import msgpack

    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_ndarray(obj: Any) -> np.ndarray:
    """An array from msgpack_numpy's dict ({b"nd": True, b"type": dtype str, b"kind": b"",
    b"shape": [...], b"data": bytes}; a numpy scalar has b"nd": False and no shape), from a
    nested list of numbers, or an array read from npz. Numeric dtypes only: never an object
    array, never unpickled."""
    if isinstance(obj, np.ndarray):  # from npz bytes (read_npz_bytes refuses object arrays)
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise RecordError("bad_shape", f"array of dtype {obj.dtype}")
        return obj
    if isinstance(obj, (list, tuple, int, float)) and not isinstance(obj, bool):
        return np.asarray(obj, dtype=np.float64)  # ragged or non-numeric lists raise ValueError
    if not isinstance(obj, dict):
        raise RecordError("bad_record", f"{type(obj).__name__} where an array should be")
    get = lambda k: obj.get(k, obj.get(k.decode()))  # noqa: E731  bin or str keys alike
    nd, typestr, data = get(b"nd"), get(b"type"), get(b"data")
    if nd not in (True, False) or not isinstance(typestr, (bytes, str)) or not isinstance(data, bytes):
        raise RecordError("bad_record", "a dict that is not a msgpack_numpy array")
    dtype = np.dtype(typestr.decode() if isinstance(typestr, bytes) else typestr)
    if dtype.kind not in _NUMERIC_KINDS or dtype.shape or dtype.hasobject:
        raise RecordError("bad_shape", f"array of dtype {dtype}")
    shape = get(b"shape") if nd else ()
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise RecordError("bad_record", f"array shape {shape!r}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise RecordError("bad_record", f"{len(data)} bytes for an array of shape {list(shape)} {dtype}")
    return np.frombuffer(data, dtype).reshape(shape)


def read_npz_bytes(data: bytes, names: Iterable[str], max_bytes: Optional[int] = None) -> dict[str, np.ndarray]:
    """The arrays `names` an npz holds (others left out), within `max_bytes` (default MAX_RECORD_BYTES)
    once inflated, read from the zip directory and .npy headers first (no pickle: object arrays are
    refused)."""
    max_bytes = MAX_RECORD_BYTES if max_bytes is None else max_bytes
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename: i for i in z.infolist()}
        for name in names:
            if f"{name}.npy" not in members:
                continue
            array = _read_npy(z, members[f"{name}.npy"], max_bytes - sum(a.nbytes for a in arrays.values()))
            if array is None:
                raise RecordError("record_too_large", f"npz arrays beyond {max_bytes} bytes")
            arrays[name] = array
    return arrays


def decode_value(data: bytes, names: Iterable[str]) -> dict[str, Any]:
    """An LMDB value as a dict of fields: npz bytes, an lz4 frame of msgpack, or msgpack."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError("record_too_large", f"{len(data)} bytes")
    if data[:2] == NPZ_MAGIC:
        return read_npz_bytes(data, names)
    if data[:4] == LZ4_MAGIC:
        data = lz4_decompress(data)
    value = unpack_msgpack(data)
    if not isinstance(value, dict):
        raise RecordError("bad_record", f"a msgpack {type(value).__name__}, expected a map")
    return {k.decode("utf-8") if isinstance(k, bytes) else k: v for k, v in value.items()}


def lmdb_value(env, key: str) -> bytes:
    """The value of `key` in an LMDB environment, refused from its length when over MAX_RECORD_BYTES (the
    value is a view of the memory map until copied)."""
    import lmdb

    try:
        with env.begin(buffers=True) as txn:
            value = txn.get(key.encode("utf-8"))
            if value is None:
                raise RecordError("bad_record", f"no record {key!r}")
            if len(value) > MAX_RECORD_BYTES:
                raise RecordError("record_too_large", f"{len(value)} bytes")
            return bytes(value)
    except lmdb.Error as e:  # a damaged page: this record is lost, the others may be fine
        raise RecordError("bad_record", f"{type(e).__name__}: {e}") from None


def array_field(record: dict, name: str, ndim: int, n: Optional[int] = None) -> np.ndarray:
    """A required `ndim`-d array field with `n` rows when given."""
    if record.get(name) is None:
        raise RecordError("missing_field", f"no {name!r}")
    array = decode_ndarray(record[name])
    if array.ndim != ndim or (n is not None and array.shape[0] != n):
        raise RecordError("bad_shape", f"{name} of shape {list(array.shape)}")
    return array


# ---------------------------------------------------------------- planning

def open_lmdb(path: Path):
    """An LMDB environment opened read-only without a lock file (the databases may be on read-only media);
    ValueError naming the folder when it is no readable LMDB."""
    with lmdb_errors(path):
        import lmdb

        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, create=False, subdir=True,
                         max_readers=16)


@contextmanager
def lmdb_errors(path: Path) -> Iterator[None]:
    """LMDB's own errors (a damaged or foreign file) as one ValueError naming the folder."""
    import lmdb

    try:
        yield
    except lmdb.Error as e:
        raise ValueError(f"LMDB {path} cannot be read: {type(e).__name__}: {e}") from None


def lmdb_folder(path: str | Path, what: str) -> Path:
    """The LMDB folder (holding data.mdb) `path` is or holds exactly one of; ValueError naming the flag."""
    path = Path(os.path.abspath(path))
    if (path / "data.mdb").is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"{what} not found: {path}")
    found = sorted(p.parent for p in path.glob("*/data.mdb"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{what} {path} holds no LMDB (no data.mdb in it or in a folder below it)")
    raise ValueError(f"{what} {path} holds {len(found)} LMDBs ({', '.join(p.name for p in found)}): "
                     f"name the one to read (e.g. {found[0]})")



def source_stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def caption_entries(captions: str | Path, images: dict[str, tuple[str, str]],
                    skipped: Counter) -> list[Entry]:
    """A captions file (as `vlpt shards regions` reads it) joined with the images a source holds:
    `images` maps image id -> (source file, locator). Captions of other images are "unknown_image_id"."""
    rows, _, caption_skips = load_captions(captions)
    skipped.update(caption_skips)
    stats: dict[str, tuple[int, int]] = {}
    entries = []
    for image_id, caption, caption_id in rows:
        where = images.get(image_id)
        if where is None:
            skipped["unknown_image_id"] += 1
            continue
        source, locator = where
        if source not in stats:
            stats[source] = source_stat(Path(source))
        entries.append(Entry(f"{_safe(image_id)}-{_safe(caption_id)}", source, image_id, caption, caption_id,
                             *stats[source], locator=locator))
    return entries


def image_id_of(value: Any) -> Optional[str]:
    """An image id from a source (str or int), or None for one no text may hold."""
    return _id(value)


def build_from_records(kind: str, out: Path, entries: list[Entry], skipped: Counter, meta: dict, opener: type,
                       what: str, reader_params: Optional[dict] = None, **build) -> dict:
    """Region shards of planned `entries` read by `opener` (a RecordReader class), with the layout of
    the first usable record (`what` names the source in the error when none is usable); `build`:
    data.builders.build_region_record_shards' keyword arguments (box selection, sharding)."""
    layout = (0, 0, ())
    if entries:
        with opener(reader_params or {}) as reader:
            layout = infer_layout(reader, entries, what)
    return build_region_record_shards(kind, out, entries, skipped, layout, meta, opener=opener,
                                      reader_params=reader_params, **build)


def infer_layout(reader: RecordReader, entries: list[Entry], what: str) -> tuple[int, int, tuple[str, ...]]:
    """(img_dim, label_dim, fields) of the first usable record, in plan order; ValueError saying why the
    first record failed when none is usable."""
    first_error = None
    for e in {(e.source, e.locator): e for e in entries}.values():
        try:
            layout = region_layout(reader.read(e).arrays())
        except RecordError as err:
            first_error = first_error or f"{e.image_id}: {err}"
            continue
        except DECODE_ERRORS as err:
            first_error = first_error or f"{e.image_id}: {type(err).__name__}: {err}"
            continue
        if layout is not None:
            return layout
        first_error = first_error or f"{e.image_id}: features or soft labels are not 2-d"
    raise ValueError(f"none of the {len(entries)} captioned images of {what} has usable region features "
                     f"(first: {first_error})")
