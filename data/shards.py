"""On-disk region-feature format: webdataset tar shards plus a manifest.

One tar member group per image-text pair (key `train-scene-000123-1`):

    <key>.json  {"image_id": str, "caption": str, "caption_id": str}
    <key>.npz   np.savez (uncompressed): features [n, img_dim] fp16, norm_bb [n, 6] fp32,
                conf [n] fp32, soft_labels [n, label_dim] fp16

`manifest.json` beside the shards lists them with sample counts, sizes and
sha256 checksums. Decoding never raises on bad data: it returns
(None, reason) so the loader can count skips by reason (DESIGN §5).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import webdataset as wds

from data.storage import S3Options, join, open_stream, read_bytes

FORMAT = "vlpt-regions-v1"
PIXEL_FORMAT = "vlpt-pixels-v1"
"""Pixel shards (data/builders.py): `<key>.jpg`/`.png` (original file bytes) + the same `<key>.json`."""
MANIFEST_NAME = "manifest.json"
REGION_FIELDS = ("features", "norm_bb", "conf", "soft_labels")
SKIP_REASONS = (
    "missing_json", "bad_json", "missing_image_id", "missing_caption", "empty_caption",
    "missing_npz", "bad_npz", "missing_field", "no_regions", "wrong_feature_dim",
    "bad_shape", "nonfinite_features", "caption_too_long", "corrupt_tar",
)
"""Why a region sample was skipped. All but "corrupt_tar" are per sample (decode_region_sample);
"corrupt_tar" is counted once per unreadable shard read by the loader (the samples lost
after the damage are not counted, being never seen)."""
PIXEL_SKIP_REASONS = ("missing_json", "bad_json", "missing_image_id", "missing_caption", "empty_caption",
                      "missing_image", "bad_image", "corrupt_tar")
"""Why a picture sample was skipped (decode_pixel_sample; "corrupt_tar" as above)."""
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _count_keys(path: Path) -> int:
    with tarfile.open(path, "r:") as tar:
        keys = {_split_name(m.name)[0] for m in tar.getmembers() if m.isfile()}
    return len(keys - {None})


def write_manifest(
    directory: str | Path, shard_paths: Iterable[str | Path], meta: dict, counts: Optional[list[int]] = None,
    fmt: str = FORMAT,
) -> dict:
    """Write `directory/manifest.json` for the given shards; return the manifest dict.

    `fmt` is the manifest's `format`. For region shards (FORMAT) `meta` must hold
    `img_dim` and `label_dim`; other keys (split, seed, ...) are kept.
    Shard paths are stored relative to `directory`. `counts` (samples per shard,
    as returned by write_shard) saves re-reading the tars to count their keys.
    """
    directory = Path(directory)
    for k in ("img_dim", "label_dim") if fmt == FORMAT else ():
        if not isinstance(meta.get(k), int) or meta[k] < 1:
            raise ValueError(f"manifest meta needs a positive int {k!r}, got {meta.get(k)!r}")
    paths = [Path(p) for p in shard_paths]
    if counts is not None and len(counts) != len(paths):
        raise ValueError(f"got {len(counts)} counts for {len(paths)} shards")
    shards = []
    for k, p in enumerate(paths):
        shards.append({
            "path": p.resolve().relative_to(directory.resolve()).as_posix(),
            "num_samples": _count_keys(p) if counts is None else int(counts[k]),
            "bytes": p.stat().st_size,
            "sha256": file_sha256(p),
        })
    manifest = {
        **meta,
        "format": fmt,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
    }
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

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _manifest_location(where: str) -> str:
    where = str(where)
    if where.endswith(".json"):
        return where
    if where.startswith("s3://"):
        return where.rstrip("/") + "/" + MANIFEST_NAME
    return str(Path(where) / MANIFEST_NAME)


def read_manifest(directory: str | Path, expected_format: str = FORMAT, s3: Optional[S3Options] = None) -> Manifest:
    """Parse `directory/manifest.json` (or a manifest file path); ValueError naming the file if bad.

    `directory` may be a local directory or an `s3://bucket/prefix` (read with the
    options `s3`); shard paths in the manifest are relative to it. A manifest of
    another `format` than `expected_format` is rejected (a pixel dataset is never
    read as region features). Non-region manifests need no img_dim/label_dim;
    those fields are then 0 unless the manifest has them.
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
        return _parse_manifest(file, data, expected_format)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"manifest {file} is invalid: {e}") from None


def _parse_manifest(file: str, data: dict, expected_format: str = FORMAT) -> Manifest:
    if data.get("format") != expected_format:
        raise ValueError(f"format is {data.get('format')!r}, expected {expected_format!r}")
    if expected_format == FORMAT:
        img_dim, label_dim = data["img_dim"], data["label_dim"]
    else:
        img_dim, label_dim = data.get("img_dim", 0), data.get("label_dim", 0)
    if not (isinstance(img_dim, int) and isinstance(label_dim, int)):
        raise ValueError("img_dim and label_dim must be integers")
    root = file.rsplit("/", 1)[0] if file.startswith("s3://") else str(Path(file).parent.resolve())
    paths, counts, sums = [], [], []
    for s in data["shards"]:
        p = str(s["path"])
        paths.append(join(root, p))
        if not isinstance(s["num_samples"], int) or s["num_samples"] < 0:
            raise ValueError(f"shard {p}: num_samples must be a non-negative int")
        counts.append(s["num_samples"])
        sums.append(str(s.get("sha256", "")))
    if not paths:
        raise ValueError("it lists no shards")
    meta = {k: v for k, v in data.items() if k != "shards"}
    return Manifest(root, paths, counts, img_dim, label_dim, sums, meta)


def verify_manifest(manifest: Manifest) -> list[str]:
    """Local shards whose sha256 differs from the manifest (empty list = all good)."""
    return [p for p, h in zip(manifest.shards, manifest.sha256) if "://" not in p and file_sha256(p) != h]


# ---------------------------------------------------------------- reading

def _split_name(name: str) -> tuple[Optional[str], Optional[str]]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def iter_shard(url: str | Path, offset: int = 0, s3: Optional[S3Options] = None,
               stats: Optional[dict[str, int]] = None) -> Iterator[dict]:
    """Raw samples of one tar (local path or s3:// URL), in file order, from byte `offset`.

    A sample is {"__key__", "__url__", "__offset__", "__end__", ext: bytes, ...}:
    consecutive members with the same key, `__offset__` the byte where its first
    member's header starts and `__end__` the byte after its last member, so a reader
    can later re-open the shard at a sample boundary. `offset` must be such a
    boundary. A corrupt or truncated tar raises tarfile.TarError after the complete
    samples before the damage were yielded (the loader counts it and moves on).
    """
    current: Optional[dict] = None
    with open_stream(str(url), offset, s3, stats) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        # streaming mode: no seeks, the same code path for a file and a network stream
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if key is None:
                continue
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": str(url), "__offset__": offset + member.offset}
            current[ext] = data
            current["__end__"] = offset + member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if current is not None:
        yield current


# ---------------------------------------------------------------- decoding

@dataclass
class RegionSample:
    """One decoded image-text pair, ready for collate."""

    key: str
    image_id: str
    input_ids: np.ndarray  # [T] int64 word pieces, no [CLS]/[SEP], T <= max_txt_len
    img_feat: np.ndarray  # [n, img_dim] float32
    img_pos: np.ndarray  # [n, 7] float32: x1, y1, x2, y2, w, h, w*h
    soft_labels: np.ndarray  # [n, label_dim] float32
    dataset: str = ""
    """Name of the dataset it came from (several may be mixed in one batch)."""


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
    if not meta["caption"].strip():
        return None, "empty_caption"
    return meta, None


def _load_regions(raw: dict) -> tuple[Optional[dict], Optional[str]]:
    if raw.get("npz") is None:
        return None, "missing_npz"
    try:
        # np.load's NpzFile reads members through small zip-stream reads; whole-member
        # reads are ~1.5x faster and this runs for every sample of every epoch.
        with zipfile.ZipFile(io.BytesIO(raw["npz"])) as z:
            present = set(z.namelist())
            arrays = {k: np.lib.format.read_array(io.BytesIO(z.read(f"{k}.npy")), allow_pickle=False)
                      for k in REGION_FIELDS if f"{k}.npy" in present}
    except Exception:  # a damaged zip can fail in many ways; all mean the same here
        return None, "bad_npz"
    if len(arrays) < len(REGION_FIELDS):
        return None, "missing_field"
    return arrays, None


def _check_regions(a: dict, img_dim: Optional[int], label_dim: Optional[int]) -> Optional[str]:
    feats = a["features"]
    if feats.ndim != 2 or (img_dim is not None and feats.shape[1] != img_dim):
        return "wrong_feature_dim"
    n = feats.shape[0]
    if n == 0:
        return "no_regions"
    soft = a["soft_labels"]
    if a["norm_bb"].shape != (n, 6) or a["conf"].shape != (n,) or soft.ndim != 2 or soft.shape[0] != n:
        return "bad_shape"
    if label_dim is not None and soft.shape[1] != label_dim:
        return "bad_shape"
    if not all(np.issubdtype(a[k].dtype, np.number) for k in REGION_FIELDS):
        return "bad_shape"
    if not all(np.isfinite(a[k]).all() for k in ("features", "norm_bb", "soft_labels")):
        return "nonfinite_features"
    return None


def decode_region_sample(
    raw: dict,
    tokenizer,
    max_txt_len: int,
    img_dim: Optional[int] = None,
    label_dim: Optional[int] = None,
) -> tuple[Optional[RegionSample], Optional[str]]:
    """Decode a raw sample from `iter_shard`; (sample, None) or (None, reason from SKIP_REASONS).

    Bad data never raises. Captions longer than `max_txt_len` word pieces are
    dropped, as UNITER drops them (its text DB keeps only ids with len <= max_txt_len);
    `img_dim`/`label_dim`, when given, are the expected widths.
    """
    if max_txt_len < 1:
        raise ValueError(f"max_txt_len must be >= 1, got {max_txt_len}")
    meta, reason = _decode_meta(raw)
    if reason:
        return None, reason
    arrays, reason = _load_regions(raw)
    if reason:
        return None, reason
    reason = _check_regions(arrays, img_dim, label_dim)
    if reason:
        return None, reason
    ids = np.asarray(tokenizer.encode(meta["caption"]), dtype=np.int64)  # [T]
    if ids.size == 0:  # e.g. only characters the normaliser drops
        return None, "empty_caption"
    if ids.size > max_txt_len:
        return None, "caption_too_long"
    bb = arrays["norm_bb"].astype(np.float32)  # [n, 6]
    img_pos = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)  # [n, 7], UNITER appends w*h
    sample = RegionSample(
        key=str(raw.get("__key__", meta.get("caption_id", ""))),
        image_id=meta["image_id"],
        input_ids=ids,
        img_feat=arrays["features"].astype(np.float32),
        img_pos=img_pos,
        soft_labels=arrays["soft_labels"].astype(np.float32),
    )
    return sample, None


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


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


def decode_pixel_sample(raw: dict, tokenizer) -> tuple[Optional[PixelSample], Optional[str]]:
    """Decode a raw pixel-shard sample; (sample, None) or (None, reason from PIXEL_SKIP_REASONS).
    Bad data never raises: an undecodable picture is "bad_image"."""
    from data.pixels import decode_image

    meta, reason = _decode_meta(raw)
    if reason:
        return None, reason
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if raw.get(ext) is not None), None)
    if data is None:
        return None, "missing_image"
    try:
        image = decode_image(data)
    except ValueError:
        return None, "bad_image"
    if not tokenizer.encode(meta["caption"]):  # e.g. only characters the normaliser drops
        return None, "empty_caption"
    key = str(raw.get("__key__", meta.get("caption_id", "")))
    return PixelSample(key, meta["image_id"], meta["caption"], image), None
