"""On-disk region-feature format: webdataset tar shards plus a manifest.

One tar member group per image-text pair (key `train-scene-000123-1`):

    <key>.json  {"image_id": str, "caption": str, "caption_id": str}
    <key>.npz   np.savez (uncompressed): features [n, img_dim] fp16, norm_bb [n, 6] fp32,
                optional conf [n] fp32, optional soft_labels [n, label_dim] fp16

The manifest's `fields` lists the arrays its shards carry (manifests without it carry all four).

`manifest.json` beside the shards lists them with sample counts, sizes and
sha256 checksums. Decoding never raises on bad data: it returns
(None, reason) so the loader can count skips by reason (docs/data.md, "Skip reasons").
"""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import webdataset as wds

# DecodeLimits and its defaults live in data/limits.py (data/pixels.py needs them too); re-exported here.
from data.limits import DEFAULT_MAX_MEMBER_BYTES, DecodeLimits
from data.storage import (NotARegularFile, S3Options, check_regular_file, join, join_inside, open_stream, read_bytes,
                          sha256_of)

FORMAT = "vlpt-regions-v1"
PIXEL_FORMAT = "vlpt-pixels-v2"
"""Picture shards as the builders write them (data/builders.py, data/demo_pixels.py): one sample per
picture, `<key>.jpg`/`.png`/`.webp` (the original file bytes) + `<key>.json` {"image_id", "captions":
[str, ...], "caption_ids": [str, ...]}; the manifest counts pictures (`num_samples`) and pairs
(`num_pairs`)."""
PIXEL_FORMAT_V1 = "vlpt-pixels-v1"
"""The older picture layout, still read: one sample per (picture, caption) pair, `<key>.json`
{"image_id", "caption", "caption_id"}; the picture repeated for each caption."""
PIXEL_FORMATS = (PIXEL_FORMAT_V1, PIXEL_FORMAT)
PAIR_MARK = "__pair__"
"""Raw-sample key the readers add to a multi-caption picture sample: which of its captions this
(picture, caption) pair is (data/sources.py expands a sample into its pairs)."""
MANIFEST_NAME = "manifest.json"
REQUIRED_REGION_FIELDS = ("features", "norm_bb")
OPTIONAL_REGION_FIELDS = ("conf", "soft_labels")
"""conf only serves box selection when shards are built; soft_labels only the MRC tasks."""
REGION_FIELDS = REQUIRED_REGION_FIELDS + OPTIONAL_REGION_FIELDS
SKIP_REASONS = (
    "missing_json", "bad_json", "missing_image_id", "missing_caption", "bad_caption", "empty_caption",
    "missing_npz", "bad_npz", "npz_too_large", "missing_field", "no_regions", "wrong_feature_dim",
    "bad_shape", "nonfinite_features", "bad_boxes", "bad_soft_labels", "caption_too_long", "corrupt_tar",
)
"""Why a region sample was skipped. All but "corrupt_tar" are per sample (decode_region_sample);
"corrupt_tar" is counted once per unreadable shard read by the loader (the samples lost
after the damage are not counted, being never seen). "bad_caption": the caption holds
characters no tokenizer input may hold (see `caption_reason`); "npz_too_large": its arrays
would take more than `DecodeLimits.max_member_bytes`; "nonfinite_features": a value is not
finite in the training dtype (float32, and fp16's range in fp16 runs); "bad_boxes": a
`norm_bb` value outside [0, 1] by more than BOX_TOLERANCE; "bad_soft_labels": a soft label
row with a negative entry or not summing to 1 within SOFT_LABEL_SUM_TOLERANCE."""
LENGTH_FILTERED = ("caption_too_long",)
"""Skip reasons that are the length policy, not bad input: UNITER drops captions over data.max_txt_len
word pieces (ALBEF truncates them in collate). The run counts them as "filtered_length", never toward
data.max_bad_per_1000 (docs/data.md, "Captions over data.max_txt_len")."""
PIXEL_SKIP_REASONS = ("missing_json", "bad_json", "missing_image_id", "missing_caption", "bad_caption",
                      "empty_caption", "missing_image", "bad_image", "image_too_large", "corrupt_tar",
                      "bad_captions", "no_captions", "too_many_captions")
"""Why a picture sample was skipped (decode_pixel_sample; "corrupt_tar" as above);
"image_too_large": its header declares more than `DecodeLimits.max_image_pixels` pixels. A
multi-caption sample whose `captions` are not a list of strings (or whose `caption_ids` do not
match them) is "bad_captions", an empty list "no_captions", a list longer than
`DecodeLimits.max_captions` "too_many_captions": each one bad input, counted once."""
# webdataset's rule: key = everything up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# ---------------------------------------------------------------- writing

def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez bytes of `arrays` (deterministic: zip entries carry a fixed date)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: fp16 features barely compress, and reads stay cheap
    return buf.getvalue()


def _encode_sample(sample: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if ext == "json" and not isinstance(value, (bytes, str)):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        elif ext == "npz" and isinstance(value, dict):
            value = encode_npz(value)
        out[ext] = value.encode("utf-8") if isinstance(value, str) else value
    return out


def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """Write samples to one tar; return the count.

    A sample is {"__key__": str, "json": dict | str | bytes, "npz": dict of arrays | bytes};
    other extensions must already be str or bytes.

    Member metadata (mtime, owner, mode) is fixed so equal samples give equal bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as writer:
        for sample in samples:
            if "__key__" not in sample or "." in sample["__key__"]:
                raise ValueError(f"every sample needs a '__key__' without dots, got {sample.get('__key__')!r}")
            writer.write(_encode_sample(sample))
            count += 1
    return count


def file_sha256(path: str | Path) -> str:
    return sha256_of(str(path))


def _count_keys(path: Path) -> int:
    with tarfile.open(path, "r:") as tar:
        keys = {split_member_name(m.name)[0] for m in tar.getmembers() if m.isfile()}
    return len(keys - {None})


def _count_pairs(path: Path) -> int:
    """(picture, caption) pairs of a picture shard: what a reader expands its samples into."""
    return sum(pixel_pairs(raw, DecodeLimits().max_captions) or 1 for raw in iter_shard(path))


def write_manifest(
    directory: str | Path, shard_paths: Iterable[str | Path], meta: dict, counts: Optional[list[int]] = None,
    fmt: str = FORMAT, pairs: Optional[list[int]] = None,
) -> dict:
    """Write `directory/manifest.json` for the given shards; return the manifest dict.

    `fmt` is the manifest's `format`. For region shards (FORMAT) `meta` must hold
    `img_dim` and `label_dim` (0 when its `fields` lack soft_labels); other keys (split,
    seed, `fields`, ...) are kept.
    Shard paths are stored relative to `directory`. `counts` (samples per shard,
    as returned by write_shard) saves re-reading the tars to count their keys.
    Picture shards (PIXEL_FORMAT) also list their (picture, caption) pairs, `num_pairs`, per
    shard and in all: `pairs` per shard, else counted from the tars.
    """
    directory = Path(directory)
    for k in ("img_dim", "label_dim") if fmt == FORMAT else ():
        least = 0 if k == "label_dim" and "soft_labels" not in meta.get("fields", REGION_FIELDS) else 1
        if not isinstance(meta.get(k), int) or meta[k] < least:
            raise ValueError(f"manifest meta needs an int {k!r} >= {least}, got {meta.get(k)!r}")
    paths = [Path(p) for p in shard_paths]
    if counts is not None and len(counts) != len(paths):
        raise ValueError(f"got {len(counts)} counts for {len(paths)} shards")
    if pairs is not None and len(pairs) != len(paths):
        raise ValueError(f"got {len(pairs)} pair counts for {len(paths)} shards")
    shards = []
    for k, p in enumerate(paths):
        shards.append({
            "path": p.resolve().relative_to(directory.resolve()).as_posix(),
            "num_samples": _count_keys(p) if counts is None else int(counts[k]),
            "bytes": p.stat().st_size,
            "sha256": file_sha256(p),
        })
        if fmt == PIXEL_FORMAT:
            shards[-1]["num_pairs"] = _count_pairs(p) if pairs is None else int(pairs[k])
    manifest = {
        **meta,
        "format": fmt,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
    }
    if fmt == PIXEL_FORMAT:
        manifest["num_pairs"] = sum(s["num_pairs"] for s in shards)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------- manifest

@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json; `shards` are absolute paths or URLs (s3://...)."""

    root: str
    shards: list[str]
    counts: list[int]
    img_dim: int
    label_dim: int
    sha256: list[str]
    meta: dict
    sizes: list[Optional[int]] = field(default_factory=list)
    """Bytes of each shard as the manifest lists them (None where it gives none)."""
    pairs: list[int] = field(default_factory=list)
    """(picture, caption) pairs of each shard (PIXEL_FORMAT); empty: one pair per sample."""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def units(self) -> list[int]:
        """What a reader splits an epoch into, per shard: pairs of picture shards, else samples."""
        return self.pairs or self.counts

    @property
    def fields(self) -> tuple[str, ...]:
        """The region arrays its shards carry (`fields`; all four in manifests written before it)."""
        fields = self.meta.get("fields")
        return tuple(fields) if isinstance(fields, list) else REGION_FIELDS

    @property
    def has_soft_labels(self) -> bool:
        return "soft_labels" in self.fields


def _manifest_location(where: str) -> str:
    where = str(where)
    if where.endswith(".json"):
        return where
    if where.startswith("s3://"):
        return where.rstrip("/") + "/" + MANIFEST_NAME
    return str(Path(where) / MANIFEST_NAME)


def read_manifest(directory: str | Path, expected_format: str | tuple[str, ...] = FORMAT,
                  s3: Optional[S3Options] = None,
                  allow_outside: bool = False) -> Manifest:
    """Parse `directory/manifest.json` (or a manifest file path); ValueError naming the file if bad.

    `directory` may be a local directory or an `s3://bucket/prefix` (read with the
    options `s3`); shard paths in the manifest are relative to it. A manifest of
    another `format` than `expected_format` is rejected (a pixel dataset is never
    read as region features); `expected_format` may be a tuple of formats, and a reader of
    PIXEL_FORMAT also takes the older PIXEL_FORMAT_V1. Non-region manifests need no
    img_dim/label_dim; those fields are then 0 unless the manifest has them.

    Shard paths must stay inside the manifest's folder (after `..` and symlinks) or S3
    prefix, unless `allow_outside` (`data.allow_outside_shards`): a manifest is data, and
    must not point the reader at /etc/passwd or another bucket. A local shard that exists
    but is not a regular file (FIFO, device, directory) is refused here; one missing is
    left to the reader, which skips and counts it.
    """
    file = _manifest_location(str(directory))
    try:
        data = json.loads(read_bytes(file, s3).decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"manifest not found: {file} (write the dataset first: `vlpt shards ...`, or `vlpt demo-data` for the demo)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest {file} is not readable JSON: {e}") from None
    except Exception as e:  # botocore: no credentials, access denied, unknown endpoint, ...
        if type(e).__module__.startswith("botocore"):
            raise ValueError(f"manifest {file} could not be read: {type(e).__name__}: {e}") from None
        raise
    try:
        manifest = _parse_manifest(file, data, expected_format, allow_outside)
    except (KeyError, TypeError, ValueError) as e:
        hint = "; set data.allow_outside_shards=true to allow it" if "outside" in str(e) else ""
        raise ValueError(f"manifest {file} is invalid: {e}{hint}") from None
    for path in manifest.shards:
        if "://" not in path or path.startswith("file://"):
            try:
                check_regular_file(path)
            except NotARegularFile as e:
                raise ValueError(f"manifest {file} lists {e}: shards must be plain files") from None
    return manifest


def _accepted_formats(expected: str | tuple[str, ...]) -> tuple[str, ...]:
    """The formats a reader of `expected` takes: a PIXEL_FORMAT reader also takes PIXEL_FORMAT_V1."""
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    return tuple(dict.fromkeys(f for e in expected for f in (PIXEL_FORMATS if e == PIXEL_FORMAT else (e,))))


def _parse_manifest(file: str, data: dict, expected_format: str | tuple[str, ...] = FORMAT,
                    allow_outside: bool = False) -> Manifest:
    accepted = _accepted_formats(expected_format)
    if data.get("format") not in accepted:
        raise ValueError(f"format is {data.get('format')!r}, expected {' or '.join(map(repr, accepted))}")
    expected_format = data["format"]
    if expected_format == FORMAT:
        img_dim, label_dim = data["img_dim"], data["label_dim"]
    else:
        img_dim, label_dim = data.get("img_dim", 0), data.get("label_dim", 0)
    if not (isinstance(img_dim, int) and isinstance(label_dim, int)):
        raise ValueError("img_dim and label_dim must be integers")
    if expected_format == FORMAT:
        _check_fields(data.get("fields", list(REGION_FIELDS)), label_dim)
    root = manifest_root(file)
    paths, counts, sums, sizes, pairs = [], [], [], [], []
    for s in data["shards"]:
        p = str(s["path"])
        paths.append(join(root, p) if allow_outside else join_inside(root, p))
        if not isinstance(s["num_samples"], int) or s["num_samples"] < 0:
            raise ValueError(f"shard {p}: num_samples must be a non-negative int")
        counts.append(s["num_samples"])
        sums.append(str(s.get("sha256", "")))
        size = s.get("bytes")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"shard {p}: bytes must be a non-negative int")
        sizes.append(size)
        if expected_format == PIXEL_FORMAT:  # each sample holds one picture and at least one caption
            if not isinstance(s["num_pairs"], int) or s["num_pairs"] < s["num_samples"]:
                raise ValueError(f"shard {p}: num_pairs must be an int >= its num_samples")
            pairs.append(s["num_pairs"])
    if not paths:
        raise ValueError("it lists no shards")
    meta = {k: v for k, v in data.items() if k != "shards"}
    return Manifest(root, paths, counts, img_dim, label_dim, sums, meta, sizes, pairs)


def _check_fields(fields: Any, label_dim: int) -> None:
    if not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise ValueError("fields must be a list of array names")
    unknown = sorted(set(fields) - set(REGION_FIELDS))
    missing = [f for f in REQUIRED_REGION_FIELDS if f not in fields]
    if unknown or missing:
        raise ValueError(f"fields {fields} must hold {', '.join(REQUIRED_REGION_FIELDS)} and only "
                         f"{', '.join(REGION_FIELDS)}")
    if "soft_labels" in fields and label_dim < 1:
        raise ValueError(f"its shards carry soft_labels but label_dim is {label_dim}")


def manifest_root(where: str) -> str:
    """The folder or S3 prefix a dataset's shard paths are relative to: where its manifest lies
    (`where` as `data.train` names it: a folder, an s3:// prefix or the manifest file)."""
    file = _manifest_location(str(where))
    return file.rsplit("/", 1)[0] if file.startswith("s3://") else str(Path(file).parent.resolve())


def verify_manifest(manifest: Manifest) -> list[str]:
    """Local shards whose sha256 differs from the manifest (empty list = all good)."""
    return [p for p, h in zip(manifest.shards, manifest.sha256) if "://" not in p and file_sha256(p) != h]


# ---------------------------------------------------------------- reading

def split_member_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """(sample key, extension) of a tar member name by webdataset's rule, or (None, None)."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


SHARD_SKIP_REASONS = ("corrupt_tar", "missing_shard", "not_a_file", "sha256_mismatch", "manifest_mismatch",
                      "member_too_large", "duplicate_member")
"""What the reading side counts (data/sources.py, data/loader.py), besides the decoders' reasons.
Once per shard and epoch by the reader that meets it: "corrupt_tar" (damaged or truncated tar),
"missing_shard" (listed, not there: deleted, or an S3 object still missing after
storage.s3.missing_retries), "not_a_file" (a FIFO, device or directory where a shard should be;
skipped without opening), "sha256_mismatch" (data.verify_sha256: the shard is skipped),
"manifest_mismatch" (the shard holds more or fewer samples, or other bytes, than the manifest
says; it is still read as far as the manifest's count). Per sample: "member_too_large" (a member
over data.max_member_bytes, skipped from its header without reading it), "duplicate_member"
(the same key.ext twice in one sample; which one is meant cannot be known)."""
SKIP_MARK = "__skip__"
"""Raw-sample key holding the reason a sample must be skipped before decoding."""


def iter_shard(url: str | Path, offset: int = 0, s3: Optional[S3Options] = None,
               stats: Optional[dict[str, int]] = None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Raw samples of one tar (local path or s3:// URL), in file order, from byte `offset`.

    A sample is {"__key__", "__url__", "__offset__", "__end__", ext: bytes, ...}:
    consecutive members with the same key, `__offset__` the byte where its first
    member's header starts and `__end__` the byte after its last member, so a reader
    can later re-open the shard at a sample boundary. `offset` must be such a
    boundary. A corrupt or truncated tar raises tarfile.TarError after the complete
    samples before the damage were yielded (the loader counts it and moves on).
    A sample with a member over `max_member_bytes` (never read: the streaming tar
    skips its body) or a repeated member carries SKIP_MARK = "member_too_large" /
    "duplicate_member" instead of those members.
    """
    current: Optional[dict] = None
    exts: set[str] = set()
    with open_stream(str(url), offset, s3, stats) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        # streaming mode: no seeks, the same code path for a file and a network stream
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": str(url), "__offset__": offset + member.offset}
                exts = set()
            _add_member(current, exts, ext, tar, member, max_member_bytes)
            current["__end__"] = offset + member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if current is not None:
        yield current


def _add_member(sample: dict, exts: set[str], ext: str, tar: tarfile.TarFile, member: tarfile.TarInfo,
                limit: int) -> None:
    """Put the member's bytes into the sample, or mark the sample to be skipped; `exts`: the
    extensions the sample met so far."""
    if ext in exts:
        sample.setdefault(SKIP_MARK, "duplicate_member")
        sample.pop(ext, None)
    elif member.size > limit:
        sample.setdefault(SKIP_MARK, "member_too_large")
    else:
        sample[ext] = tar.extractfile(member).read()
    exts.add(ext)


# ---------------------------------------------------------------- decoding

BOX_TOLERANCE = 1e-3
"""How far a `norm_bb` value may leave [0, 1]: room for the rounding of boxes clipped to the image."""
SOFT_LABEL_SUM_TOLERANCE = 1e-3
"""How far a soft-label row's sum may be from 1. fp16 storage rounds each entry by at most 2**-11
of itself, so a detector's softmax stored as fp16 sums to 1 within about 5e-4."""
_BAD_CAPTION_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters other than tab, newline and carriage return (C0, DEL and C1), and lone
surrogates: valid as JSON escapes, but not text (no UTF-8, no tokenizer input)."""
_NPY_HEADER_LIMIT = 10_000
"""Longest .npy header read (numpy's own default limit)."""
_NPZ_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
"""np.savez and np.savez_compressed; deflate output is read in bounded steps, other methods'
decompressors are not bounded by Python's zipfile."""


@dataclass
class RegionSample:
    """One decoded image-text pair, ready for collate."""

    key: str
    image_id: str
    input_ids: np.ndarray  # [T] int64 word pieces, no [CLS]/[SEP], T <= max_txt_len
    img_feat: np.ndarray  # [n, img_dim] float32
    img_pos: np.ndarray  # [n, 7] float32: x1, y1, x2, y2, w, h, w*h
    soft_labels: np.ndarray  # [n, label_dim] float32; [n, 0] when the shards carry none
    dataset: str = ""
    """Name of the dataset it came from (several may be mixed in one batch)."""


def caption_reason(caption: str) -> Optional[str]:
    """"bad_caption" for text a tokenizer must not see, "empty_caption" for blank text, else None."""
    if _BAD_CAPTION_CHARS.search(caption):
        return "bad_caption"
    if not caption.strip():
        return "empty_caption"
    return None


def _decode_meta(raw: dict) -> tuple[Optional[dict], Optional[str]]:
    if raw.get("json") is None:
        return None, "missing_json"
    try:
        meta = json.loads(raw["json"])
    except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, "bad_json"
    if not isinstance(meta, dict):
        return None, "bad_json"
    if not isinstance(meta.get("image_id"), str) or not meta["image_id"]:
        return None, "missing_image_id"
    if not isinstance(meta.get("caption"), str):
        return None, "missing_caption"
    reason = caption_reason(meta["caption"])
    return (None, reason) if reason else (meta, None)


def _read_npy(z: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> Optional[np.ndarray]:
    """One .npy member, or None when its array holds more than `max_bytes` (known before reading
    it); raises on anything malformed."""
    if info.compress_type not in _NPZ_METHODS:
        raise ValueError(f"{info.filename}: zip compression method {info.compress_type}")
    if info.file_size > max_bytes + _NPY_HEADER_LIMIT:
        return None
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read_header(f, max_header_size=_NPY_HEADER_LIMIT)
        if dtype.hasobject or any(d < 0 for d in shape):
            raise ValueError(f"{info.filename}: pickled objects or a negative shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > max_bytes:
            return None
        data = f.read(nbytes)  # bounded: deflate never inflates past what is asked
    if len(data) != nbytes:
        raise ValueError(f"{info.filename}: {len(data)} bytes of data, its header declares {nbytes}")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def decode_regions(npz: bytes, img_dim: Optional[int], label_dim: Optional[int],
                   limits: DecodeLimits) -> tuple[Optional[dict[str, np.ndarray]], Optional[str]]:
    """One image's region arrays from its `.npz` bytes, checked as every reader checks them:
    (float32 features / norm_bb / soft_labels, None) or (None, skip reason). Never raises."""
    arrays, reason = read_region_npz(io.BytesIO(npz), limits.max_member_bytes)
    if reason:
        return None, reason
    reason = _check_shapes(arrays, img_dim, label_dim)
    if reason:
        return None, reason
    if label_dim == 0:  # the dataset has no soft labels: ignore a sample's own
        arrays.pop("soft_labels", None)
    f32 = _as_float32(arrays)
    reason = _check_values(f32, limits.max_abs_value)
    return (None, reason) if reason else (f32, None)


def read_region_npz(source: Any, max_bytes: int) -> tuple[Optional[dict], Optional[str]]:
    """The REGION_FIELDS arrays of an npz (a binary file object or a local path: the shard
    builders read their source files with it), all together within `max_bytes` once inflated;
    (arrays, None) or (None, "missing_field" | "npz_too_large" | "bad_npz"). The optional
    fields (conf, soft_labels) are left out of `arrays` when the npz has none. Never raises."""
    arrays: dict[str, np.ndarray] = {}
    try:
        # Whole-array reads (not np.load's small zip-stream reads): this runs for every sample
        # of every epoch.
        with zipfile.ZipFile(source) as z:
            members = {i.filename: i for i in z.infolist()}
            for k in REGION_FIELDS:
                if f"{k}.npy" not in members:
                    if k in OPTIONAL_REGION_FIELDS:
                        continue
                    return None, "missing_field"
                array = _read_npy(z, members[f"{k}.npy"], max_bytes - sum(a.nbytes for a in arrays.values()))
                if array is None:
                    return None, "npz_too_large"
                arrays[k] = array
    except Exception:  # a damaged zip or .npy can fail in many ways; all mean the same here
        return None, "bad_npz"
    return arrays, None


def _check_shapes(a: dict, img_dim: Optional[int], label_dim: Optional[int]) -> Optional[str]:
    """Why the arrays `a` (features and norm_bb, conf and soft_labels where present) cannot be one
    image's regions, else None. `label_dim` > 0: soft labels of that width are required; 0: none
    are expected (any present are ignored); None: any width."""
    feats = a["features"]
    if feats.ndim != 2 or (img_dim is not None and feats.shape[1] != img_dim):
        return "wrong_feature_dim"
    n = feats.shape[0]
    if n == 0:
        return "no_regions"
    if a["norm_bb"].shape != (n, 6) or ("conf" in a and a["conf"].shape != (n,)):
        return "bad_shape"
    soft = a.get("soft_labels")
    if soft is None:
        if label_dim:
            return "missing_field"
    elif label_dim != 0 and (soft.ndim != 2 or soft.shape[0] != n
                             or (label_dim is not None and soft.shape[1] != label_dim)):
        return "bad_shape"
    if not all(np.issubdtype(a[k].dtype, np.number) for k in REGION_FIELDS if k in a):
        return "bad_shape"
    return None


def _as_float32(a: dict) -> dict[str, np.ndarray]:
    """features, norm_bb and soft_labels as the model gets them; values beyond float32 become inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return {k: a[k].astype(np.float32) for k in ("features", "norm_bb", "soft_labels") if k in a}


def _check_values(f32: dict, max_abs: float) -> Optional[str]:
    """Reason for float32 arrays (from _as_float32) that the model cannot use, else None.
    Reductions rather than elementwise masks: this runs for every sample of every epoch."""
    for x in f32.values():
        if x.size and not (-max_abs <= x.min() and x.max() <= max_abs):  # NaN fails both
            return "nonfinite_features"
    bb = f32["norm_bb"]  # [n, 6] with n >= 1 (_check_shapes)
    if bb.min() < -BOX_TOLERANCE or bb.max() > 1 + BOX_TOLERANCE:
        return "bad_boxes"
    soft = f32.get("soft_labels")  # [n, K]; K = 0 sums to 0: bad_soft_labels
    if soft is None:
        return None
    sums = soft.sum(axis=1)  # [n] pairwise float32 sums: error ~1e-7, far below the tolerance
    if (soft.size and soft.min() < 0) or np.abs(sums - 1).max() > SOFT_LABEL_SUM_TOLERANCE:
        return "bad_soft_labels"
    return None


def decode_region_sample(
    raw: dict,
    tokenizer,
    max_txt_len: int,
    img_dim: Optional[int] = None,
    label_dim: Optional[int] = None,
    limits: DecodeLimits = DecodeLimits(),
) -> tuple[Optional[RegionSample], Optional[str]]:
    """Decode a raw sample from `iter_shard`; (sample, None) or (None, reason from SKIP_REASONS,
    or the SKIP_MARK reason iter_shard put on it).

    Bad data never raises. Captions longer than `max_txt_len` word pieces are
    dropped, as UNITER drops them (its text DB keeps only ids with len <= max_txt_len), with
    the reason "caption_too_long", which is in LENGTH_FILTERED (a policy, not bad input);
    `img_dim`/`label_dim`, when given, are the expected widths (`label_dim` 0: the dataset
    carries no soft labels, see `_check_shapes`); `limits` bound what a sample may cost and
    hold. A sample without soft labels gets `soft_labels` of shape [n, 0].
    """
    if max_txt_len < 1:
        raise ValueError(f"max_txt_len must be >= 1, got {max_txt_len}")
    if raw.get(SKIP_MARK):  # iter_shard found it bad (a huge or repeated member)
        return None, raw[SKIP_MARK]
    meta, reason = _decode_meta(raw)
    if reason:
        return None, reason
    if raw.get("npz") is None:
        return None, "missing_npz"
    f32, reason = decode_regions(raw["npz"], img_dim, label_dim, limits)
    if reason:
        return None, reason
    ids = np.asarray(tokenizer.encode(meta["caption"]), dtype=np.int64)  # [T]
    if ids.size == 0:  # e.g. only characters the normaliser drops
        return None, "empty_caption"
    if ids.size > max_txt_len:
        return None, "caption_too_long"
    bb = f32["norm_bb"]  # [n, 6]
    img_pos = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)  # [n, 7], UNITER appends w*h
    soft = f32.get("soft_labels")  # absent: shards built without them (only MRC needs them)
    sample = RegionSample(
        key=str(raw.get("__key__", meta.get("caption_id", ""))),
        image_id=meta["image_id"],
        input_ids=ids,
        img_feat=f32["features"],
        img_pos=img_pos,
        soft_labels=soft if soft is not None else np.zeros((len(bb), 0), np.float32),
    )
    return sample, None


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Picture members of a pixel sample (data/builders.py stores .webp files as they are)."""


@dataclass
class PixelSample:
    """One decoded picture-caption pair; augmentation and tokenization happen in collate,
    because a mirrored picture changes its caption ("left" <-> "right")."""

    key: str
    image_id: str
    caption: str
    image: Any
    """PIL RGB image."""
    dataset: str = ""


def _captions_reason(meta: dict, max_captions: int) -> Optional[str]:
    """Why a multi-caption sample's `captions` (and `caption_ids`, optional) cannot be used, else None.
    The length is checked before the items, so a hostile list costs one len() before it is refused."""
    captions, ids = meta.get("captions"), meta.get("caption_ids")
    if not isinstance(captions, list):
        return "bad_captions"
    if len(captions) > max_captions:
        return "too_many_captions"
    if not captions:
        return "no_captions"
    if not all(isinstance(c, str) for c in captions):
        return "bad_captions"
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(captions)
                                and all(isinstance(i, str) and i for i in ids)):
        return "bad_captions"
    return None


def _json_object(raw: dict) -> Optional[dict]:
    try:
        meta = json.loads(raw["json"])
    except (ValueError, TypeError, KeyError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return meta if isinstance(meta, dict) else None


def pixel_pairs(raw: dict, max_captions: int) -> Optional[int]:
    """How many (picture, caption) pairs a raw picture sample stands for, read from its JSON:
    len(captions) for a multi-caption (vlpt-pixels-v2) sample, 1 for one whose captions cannot be
    used (one bad input, which decode_pixel_sample skips with its reason), and None for a
    one-caption (vlpt-pixels-v1) sample or one whose JSON cannot be read (decoded as it is).
    A function of the sample's bytes only, so every reader counts the same pairs."""
    if raw.get(SKIP_MARK) or raw.get("json") is None:
        return None
    meta = _json_object(raw)
    if meta is None or "captions" not in meta:
        return None
    return 1 if _captions_reason(meta, max_captions) else len(meta["captions"])


def pair_of(raw: dict, k: int) -> dict:
    """Pair k of a multi-caption raw sample: a shallow copy (the picture's bytes are shared)."""
    return {**raw, PAIR_MARK: k}


def iter_pixel_pairs(raws: Iterable[dict], max_captions: int) -> Iterator[dict]:
    """Raw picture samples as decode_pixel_sample takes them: a multi-caption sample as its
    (picture, caption) pairs in caption order, a one-caption sample as it is."""
    for raw in raws:
        n = pixel_pairs(raw, max_captions)
        yield from (raw,) if n is None else (pair_of(raw, k) for k in range(n))


def _pair_meta(raw: dict, max_captions: int) -> tuple[Optional[tuple[str, str, str]], Optional[str]]:
    """(image_id, caption, key) of pair raw[PAIR_MARK] of a multi-caption sample, or (None, reason)."""
    meta = _json_object(raw)
    if meta is None:
        return None, "bad_json"
    if not isinstance(meta.get("image_id"), str) or not meta["image_id"]:
        return None, "missing_image_id"
    reason = _captions_reason(meta, max_captions)
    if reason:
        return None, reason
    k = raw[PAIR_MARK]
    caption = meta["captions"][k]
    reason = caption_reason(caption)
    if reason:
        return None, reason
    ids = meta.get("caption_ids")
    return (meta["image_id"], caption, ids[k] if ids else f"{raw.get('__key__', '')}-{k}"), None


def picture_key(raw: dict) -> tuple:
    """Which stored picture a raw sample (or one of its pairs) holds: its shard and byte offset."""
    return raw.get("__url__"), raw.get("__offset__"), raw.get("__key__")


def _decode_picture(raw: dict, limits: DecodeLimits, pictures: Optional[dict]) -> tuple[Any, Optional[str]]:
    """(PIL RGB image, None) or (None, reason); through `pictures` ({picture_key: result}) when
    given, so the pairs of one picture decode it once."""
    from data.pixels import ImageTooLargeError, decode_image

    key = picture_key(raw)
    if pictures is not None and key in pictures:
        return pictures[key]
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if raw.get(ext) is not None), None)
    try:
        result = decode_image(data, limits.max_image_pixels), None
    except ImageTooLargeError:
        result = None, "image_too_large"
    except ValueError:
        result = None, "bad_image"
    if pictures is not None:
        pictures[key] = result
    return result


def decode_pixel_sample(raw: dict, tokenizer, limits: DecodeLimits = DecodeLimits(),
                        pictures: Optional[dict] = None) -> tuple[Optional[PixelSample], Optional[str]]:
    """Decode a raw pixel-shard sample, or one (picture, caption) pair of a multi-caption sample
    (the readers mark which with PAIR_MARK); (sample, None) or (None, reason from
    PIXEL_SKIP_REASONS or SKIP_MARK).
    Bad data never raises: an undecodable picture is "bad_image", one whose header declares
    more than `limits.max_image_pixels` pixels is "image_too_large" (and is not decoded).
    `pictures`: a cache the caller keeps while pairs of the same pictures are decoded
    ({picture_key: (image, reason)}; the caller drops entries it no longer needs); the decoded
    image is shared by those pairs and must not be changed in place (collate makes new views)."""
    if raw.get(SKIP_MARK):  # iter_shard found it bad (a huge or repeated member)
        return None, raw[SKIP_MARK]
    if PAIR_MARK in raw:
        pair, reason = _pair_meta(raw, limits.max_captions)
    else:
        meta, reason = _decode_meta(raw)
        pair = (meta["image_id"], meta["caption"], str(raw.get("__key__", meta.get("caption_id", "")))) \
            if meta else None
    if reason:
        return None, reason
    image_id, caption, key = pair
    if not any(raw.get(ext) is not None for ext in IMAGE_EXTENSIONS):
        return None, "missing_image"
    if not tokenizer.encode(caption):  # e.g. only characters the normaliser drops
        return None, "empty_caption"
    image, reason = _decode_picture(raw, limits, pictures)
    if reason:
        return None, reason
    return PixelSample(key, image_id, caption, image), None
