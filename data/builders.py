"""Shard builders behind `vlpt shards coco|regions|tsv` (docs/data.md, "Shard builders").

Three sources, one pipeline:

- `build_coco_shards`: COCO-captions JSON + image folder -> pixel shards
  (format PIXEL_FORMAT, vlpt-pixels-v2): per picture `<key>.jpg` (or `.png`/`.webp`:
  the original file bytes, never re-encoded, stored once) + `<key>.json`
  {image_id, captions, caption_ids} with all its captions (at most
  DecodeLimits.max_captions a sample: an image with more is split over several).
- `build_region_shards`: one `<image_id>.npz` per image (UNITER's detector
  output: features [n, D], norm_bb [n, 6], conf [n], soft_labels [n, K]) +
  captions (COCO JSON or a list of {image_id, caption[, caption_id]}) ->
  region shards (FORMAT, the schema `decode_region_sample` reads), keeping
  num_bb = min(max_bb, max(min_bb, #(conf > conf_th))) most confident boxes.
- `build_tsv_shards`: `local_image_path<TAB>caption` lines -> pixel shards;
  the image_id is the normalised path, so one image on two lines keeps one id.
- `build_region_record_shards`: the region pipeline of `build_region_shards` for
  other sources: data/region_formats' readers (bottom-up-attention TSV, UNITER
  LMDBs, detectron2-style LMDB) plan entries with a `locator` and hand the
  builder an `opener` that reads them in its worker processes.

How a build runs:

1. Plan (main process): parse the captions, check that each source file exists,
   and cut the surviving samples, in input order, into shards of
   `samples_per_shard`. Malformed entries and missing files are counted by
   reason here (`PLAN_SKIP_REASONS`).
2. Build (a process pool of `workers`, one task per shard, tqdm bar over shards):
   read the files, drop the ones that turn out unreadable or invalid (counted,
   `BUILD_SKIP_REASONS`), and write the tar to a hidden temporary name, then
   rename it into place (an interrupted build never leaves a half shard under a
   shard's name). Only after the rename is the sidecar `.build/<shard>.json`
   written: {plan digest, num_samples, bytes, sha256, skipped}.
3. Manifest: `manifest.json` via `write_manifest` (counts, bytes, sha256), plus
   the builder's parameters and the skip counts by reason.

Re-running skips a shard when its sidecar exists, the sidecar's plan digest
equals this run's (same samples, source paths, source sizes and mtimes, same
parameters), and the shard's size and a *recomputed* sha256 match the sidecar
(one sequential read per shard; a corrupted or truncated shard is rebuilt).
Same inputs give byte-identical shards: members are in a fixed order with fixed
metadata (`write_shard`), and the shard a sample lands in depends only on its
position in the input, not on the number of workers.

Bad inputs follow the training reader's rules, so a shard never holds a sample that
training would skip: captions by `caption_reason` ("bad_caption"), region values
checked as the dtypes the shard stores (fp16 features: 1e5 is not finite there), source
npz files read by the same bounded reader ("npz_too_large"), pictures whose header
declares more than `max_image_pixels` ("image_too_large", never decoded). A source
path from an annotation file (COCO `file_name`, a TSV path, a region image_id) must stay
inside its root (the image folder, the TSV's folder, the feature folder; after `..` and
symlinks), else it is skipped as "path_outside_root" unless `allow_outside_root`; one no
file system takes (NUL, lone surrogates, control characters) is "bad_path".
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from data.atomic_write import write_atomic
from data.limits import DEFAULT_MAX_MEMBER_BYTES, FLOAT32_MAX, DecodeLimits
from data.pixels import ImageTooLargeError, open_image
from data.shards import (FORMAT, MANIFEST_NAME, PIXEL_FORMAT, REGION_FIELDS, REQUIRED_REGION_FIELDS,
                         _as_float32, _check_shapes, _check_values, caption_reason, encode_npz, file_sha256,
                         read_region_npz, write_manifest, write_shard)
from data.storage import join_inside

BUILDER_VERSION = 3
"""2: bad captions, fp16 overflow, npz and picture bombs and paths outside the root are skipped.
3: picture shards hold each picture once with all its captions (vlpt-pixels-v2)."""
SIDECAR_DIR = ".build"
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
"""Image file suffix -> shard member extension (the bytes are stored as they are)."""
PLAN_SKIP_REASONS = (
    "bad_caption_entry", "bad_caption", "empty_caption", "duplicate_caption_id", "unknown_image_id", "bad_line",
    "bad_path", "path_outside_root", "missing_image", "unsupported_image_type", "missing_npz",
)
BUILD_SKIP_REASONS = (
    "unreadable_image", "bad_image", "image_too_large", "bad_npz", "npz_too_large", "missing_field", "no_regions",
    "wrong_feature_dim", "bad_shape", "nonfinite_features", "bad_boxes", "bad_soft_labels",
)
_REGION_DTYPES = {"features": np.float16, "norm_bb": np.float32, "conf": np.float32, "soft_labels": np.float16}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Entry:
    """One planned sample: the source file (image or npz) and its caption."""

    key: str
    source: str
    image_id: str
    caption: str
    caption_id: str
    size: int  # source size and mtime enter the plan digest: a changed file rebuilds its shards
    mtime_ns: int
    locator: str = ""
    """Where in `source` the image's regions are (a TSV row's byte offset, an LMDB key: the readers
    of data/region_formats); empty for a file per image."""


@dataclass(frozen=True)
class PictureEntry:
    """One planned picture sample: the image file and its captions (vlpt-pixels-v2)."""

    key: str
    """The key of its first caption's Entry: unique in the build, as those are."""
    source: str
    image_id: str
    captions: tuple[str, ...]
    caption_ids: tuple[str, ...]
    size: int
    mtime_ns: int


def _pictures(entries: list[Entry], max_captions: int = DecodeLimits.max_captions) -> list[PictureEntry]:
    """The caption entries grouped by picture, in order of each picture's first caption, captions in
    input order; more than `max_captions` of one picture make several samples (the reader's limit)."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.image_id, e.source), []).append(e)
    out = []
    for group in groups.values():
        for at in range(0, len(group), max_captions):
            part = group[at:at + max_captions]
            out.append(PictureEntry(part[0].key, part[0].source, part[0].image_id, tuple(e.caption for e in part),
                                    tuple(e.caption_id for e in part), part[0].size, part[0].mtime_ns))
    return out


# ---------------------------------------------------------------- captions

def _safe(text: str) -> str:
    """A key part without dots or slashes (webdataset splits keys at the first dot)."""
    return _UNSAFE.sub("_", text)


def _id(value: Any) -> Optional[str]:
    """An id as a non-empty string; None for anything but a non-empty str or an int, and for a
    str holding what no text may hold (a lone surrogate cannot even be written as UTF-8)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value)
    return text if text and caption_reason(text) != "bad_caption" else None


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not readable JSON: {e}") from None


def load_captions(path: str | Path) -> tuple[list[tuple[str, str, str]], dict[str, str], Counter]:
    """Captions of a COCO-captions JSON or of a list of {image_id, caption[, caption_id]}.

    Returns ([(image_id, caption, caption_id)] in file order, {image_id: file_name}
    (COCO `images`; empty for a list), skip counts). A caption without an id
    gets `<image_id>-<k>`, k counting that image's captions. Malformed entries are
    counted, never raised; a file that is no such JSON is a ValueError.
    """
    return _parse_captions(_load_json(Path(path), "captions file"), path)


def _parse_captions(data: Any, path: str | Path) -> tuple[list[tuple[str, str, str]], dict[str, str], Counter]:
    skipped: Counter = Counter()
    file_names: dict[str, str] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for img in data.get("images") or []:
            image_id = _id(img.get("id")) if isinstance(img, dict) else None
            if image_id is not None and isinstance(img.get("file_name"), str) and img["file_name"]:
                file_names[image_id] = img["file_name"]
        entries = data["annotations"]
    elif isinstance(data, list):
        entries = data
    else:
        raise ValueError(f"captions file {path} is neither COCO captions ({{'images', 'annotations'}}) "
                         f"nor a list of {{'image_id', 'caption'}}")
    out, per_image = [], Counter()
    for ann in entries:
        image_id = _id(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id is None or not isinstance(ann.get("caption"), str):
            skipped["bad_caption_entry"] += 1
            continue
        reason = caption_reason(ann["caption"])  # the training reader's rule, applied before writing
        if reason:
            skipped[reason] += 1
            continue
        raw_id = ann.get("id", ann.get("caption_id"))
        caption_id = _id(raw_id) if raw_id is not None else f"{image_id}-{per_image[image_id]}"
        if caption_id is None:
            skipped["bad_caption_entry"] += 1
            continue
        per_image[image_id] += 1
        out.append((image_id, ann["caption"], caption_id))
    return out, file_names, skipped


def _stat(path: Path) -> Optional[os.stat_result]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st if path.is_file() else None


def _source_path(root: Path, name: str, allow_outside: bool) -> tuple[Optional[Path], Optional[str]]:
    """`name`, a path from an annotation file, resolved against `root`; or (None, "bad_path") for
    a name no file system takes, (None, "path_outside_root") for one leading out of `root`
    (absolute, `..`, a symlink) unless `allow_outside`: an annotation file is data, and must not
    make the builder copy /etc/passwd or another folder's files into shards unasked."""
    if caption_reason(name) == "bad_caption":
        return None, "bad_path"
    if allow_outside:
        return root / name, None
    try:
        return Path(join_inside(str(root), name)), None
    except ValueError:
        return None, "path_outside_root"


def _image_entry(key: str, path: Path, image_id: str, caption: str, caption_id: str,
                 skipped: Counter) -> Optional[Entry]:
    if path.suffix.lower() not in IMAGE_EXTS:
        skipped["unsupported_image_type"] += 1
        return None
    st = _stat(path)
    if st is None:
        skipped["missing_image"] += 1
        return None
    return Entry(key, str(path), image_id, caption, caption_id, st.st_size, st.st_mtime_ns)


def _dedupe(entries: list[Entry], skipped: Counter) -> list[Entry]:
    seen, out = set(), []
    for e in entries:
        if e.key in seen:
            skipped["duplicate_caption_id"] += 1
        else:
            seen.add(e.key)
            out.append(e)
    return out


# ---------------------------------------------------------------- regions

def select_regions(arrays: dict[str, np.ndarray], conf_th: float, min_bb: int, max_bb: int) -> dict[str, np.ndarray]:
    """The num_bb = min(max_bb, max(min_bb, #(conf > conf_th))) most confident boxes, by conf descending.

    Fewer boxes than num_bb: all of them (sorted the same way). Ties keep the
    file order. Without `conf`: the first max_bb boxes, in file order (detectors write them
    most confident first). Arrays are cast to the shard schema's dtypes.
    """
    if "conf" in arrays:
        conf = np.asarray(arrays["conf"], dtype=np.float32)
        num_bb = min(max_bb, max(min_bb, int((conf > conf_th).sum())))
        order = np.argsort(-conf, kind="stable")[:num_bb]
    else:
        order = np.arange(min(max_bb, len(arrays["features"])))
    return {k: np.ascontiguousarray(arrays[k][order]).astype(_REGION_DTYPES[k]) for k in REGION_FIELDS
            if k in arrays}


def _load_npz(path: str) -> tuple[Optional[dict], Optional[str]]:
    """The region arrays of a source npz, read as training reads a shard's: within the same
    byte budget, judged from its zip directory and .npy headers before inflating anything."""
    return read_region_npz(path, DEFAULT_MAX_MEMBER_BYTES)


def _as_stored(arrays: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The dataset's `fields` in the shard schema's dtypes; what fp16 cannot hold becomes inf, as it would
    on disk."""
    with np.errstate(over="ignore", invalid="ignore"):
        return {k: np.asarray(arrays[k]).astype(_REGION_DTYPES[k]) for k in fields}


def _fields(params: dict) -> tuple[str, ...]:
    """The region arrays the shards of a build carry (params record them only when some are absent, so
    the plan digests of builds with all four stay what they were)."""
    return tuple(params.get("fields", REGION_FIELDS))


def region_npz(arrays: dict[str, np.ndarray], params: dict) -> tuple[Optional[bytes], Optional[str]]:
    """The npz member of one image's region arrays as the build's `params` store them (its fields, the
    schema's dtypes, the selected boxes), or (None, skip reason): the same rules as training's decoder."""
    fields = _fields(params)
    if any(k not in arrays for k in fields):  # the dataset carries it; this image lacks it
        return None, "missing_field"
    arrays = {k: arrays[k] for k in fields}  # what the dataset does not carry is neither checked nor stored
    label_dim = params["label_dim"] if "soft_labels" in fields else 0
    reason = _check_shapes(arrays, params["img_dim"], label_dim)  # also refuses non-numeric dtypes
    if reason:
        return None, reason
    stored = _as_stored(arrays, fields)  # checked as written: a feature of 1e5 is finite in the source, inf in fp16
    reason = _check_values(_as_float32(stored), FLOAT32_MAX)
    if reason:
        return None, reason
    if "conf" in stored and not np.isfinite(stored["conf"]).all():
        return None, "nonfinite_features"
    return encode_npz(select_regions(stored, params["conf_th"], params["min_bb"], params["max_bb"])), None


def region_layout(arrays: dict[str, np.ndarray]) -> Optional[tuple[int, int, tuple[str, ...]]]:
    """(img_dim, label_dim, fields) of one image's valid 2-d region arrays, else None; label_dim is 0
    without soft labels."""
    feats, soft = arrays["features"], arrays.get("soft_labels")
    if feats.ndim != 2 or feats.shape[1] < 1 or (soft is not None and (soft.ndim != 2 or soft.shape[1] < 1)):
        return None
    fields = tuple(k for k in REGION_FIELDS if k in arrays)
    return int(feats.shape[1]), int(soft.shape[1]) if soft is not None else 0, fields


def _infer_dims(paths: list[str]) -> tuple[int, int, tuple[str, ...]]:
    """img_dim, label_dim and fields from the first npz (in plan order) that holds valid 2-d arrays."""
    for path in paths:
        arrays, reason = _load_npz(path)
        layout = region_layout(arrays) if reason is None else None
        if layout is not None:
            return layout
    raise ValueError(f"none of the {len(paths)} npz files holds readable region features "
                     f"({', '.join(REQUIRED_REGION_FIELDS)}, optionally {', '.join(REGION_FIELDS[2:])})")


# ---------------------------------------------------------------- shard building

def _meta(e: Entry) -> dict:
    return {"image_id": e.image_id, "caption": e.caption, "caption_id": e.caption_id}


def _image_ok(data: bytes, ext: str) -> bool:
    if ext == "jpg":
        return data[:3] == b"\xff\xd8\xff"
    if ext == "png":
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _pixel_samples(pictures: list[PictureEntry], skipped: Counter) -> Iterator[dict]:
    """One sample per picture; a picture that cannot be used is counted once per caption (pair) lost."""
    for e in pictures:
        ext = IMAGE_EXTS[Path(e.source).suffix.lower()]
        try:
            data = Path(e.source).read_bytes()
        except OSError:
            skipped["unreadable_image"] += len(e.captions)
            continue
        if not _image_ok(data, ext):  # a magic-number check: empty, truncated-at-start or mislabelled files
            skipped["bad_image"] += len(e.captions)
            continue
        meta = {"image_id": e.image_id, "captions": list(e.captions), "caption_ids": list(e.caption_ids)}
        yield {"__key__": e.key, ext: data, "json": meta}


def _within_budget(samples: Iterator[dict], max_pixels: int, skipped: Counter, sizes: Counter) -> Iterator[dict]:
    """The samples whose picture header is readable and declares at most `max_pixels` pixels
    (training's budget: a few KB of PNG can declare 12000 x 12000); nothing is decoded. `sizes`
    tallies what is written: pairs, picture bytes, and the picture bytes one sample per caption
    (vlpt-pixels-v1) would have stored."""
    for sample in samples:
        data = next(v for k, v in sample.items() if k in IMAGE_EXTS.values())
        n = len(sample["json"]["captions"])
        try:
            open_image(data, max_pixels)
        except ImageTooLargeError:
            skipped["image_too_large"] += n
            continue
        except ValueError:
            skipped["bad_image"] += n
            continue
        sizes.update(num_pairs=n, picture_bytes=len(data), picture_bytes_one_per_caption=n * len(data))
        yield sample


def _region_samples(entries: list[Entry], params: dict, skipped: Counter,
                    load: Optional[Callable[[Entry], tuple[Optional[dict], Optional[str]]]] = None) -> Iterator[dict]:
    """Region samples of a shard's entries; `load(entry)` gives an image's arrays (default: its npz file)."""
    load = load or (lambda e: _load_npz(e.source))
    cache: dict[tuple[str, str], tuple[Optional[bytes], Optional[str]]] = {}  # npz per image, for this shard
    for e in entries:
        where = (e.source, e.locator)
        if where not in cache:
            arrays, reason = load(e)
            cache[where] = (None, reason) if reason else region_npz(arrays, params)
        npz, reason = cache[where]
        if reason:
            skipped[reason] += 1
            continue
        yield {"__key__": e.key, "json": _meta(e), "npz": npz}


def _sidecar(path: Path) -> Path:
    return path.parent / SIDECAR_DIR / f"{path.name}.json"


def _build_shard(job: dict) -> dict:
    """Write one shard (temporary name, then rename) and its sidecar; return the sidecar record."""
    path = Path(job["path"])
    skipped: Counter = Counter()
    sizes: Counter = Counter()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with ExitStack() as stack:
            if job.get("opener") is not None:  # a region_formats reader: open its source once per shard
                load = stack.enter_context(job["opener"](job["params"]))
                samples = _region_samples(job["entries"], job["params"], skipped, load)
            elif job["kind"] == "regions":
                samples = _region_samples(job["entries"], job["params"], skipped)
            else:
                samples = _within_budget(_pixel_samples(job["entries"], skipped), job["params"]["max_image_pixels"],
                                         skipped, sizes)
            count = write_shard(tmp, samples)
        record = {"plan": job["digest"], "num_samples": count, "bytes": tmp.stat().st_size,
                  "sha256": file_sha256(tmp), "skipped": dict(sorted(skipped.items()))}
        if job["kind"] != "regions":  # picture shards: pairs and picture bytes, for the manifest and summary
            record.update({k: sizes[k] for k in ("num_pairs", "picture_bytes", "picture_bytes_one_per_caption")})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(path).parent.mkdir(exist_ok=True)
    write_atomic(_sidecar(path), json.dumps(record, sort_keys=True) + "\n")
    return record


def _up_to_date(path: Path, digest: str) -> Optional[dict]:
    """The sidecar record when `path` is a finished shard of this very plan, else None."""
    try:
        record = json.loads(_sidecar(path).read_text())
        if record["plan"] != digest or path.stat().st_size != record["bytes"]:
            return None
        return record if file_sha256(path) == record["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entry_plan(e: Entry) -> dict:
    plan = asdict(e)
    if not plan.get("locator"):  # a file per image: the digest stays what it was before locators existed
        plan.pop("locator", None)
    return plan


def _digest(kind: str, params: dict, entries: list[Entry]) -> str:
    plan = {"builder": kind, "version": BUILDER_VERSION, "params": params, "entries": [_entry_plan(e) for e in entries]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()


def _check_max_pixels(max_image_pixels: int) -> None:
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be an integer >= 1, got {max_image_pixels!r}")


def _check_common(out: Path, samples_per_shard: int, workers: int) -> None:
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an integer >= 1, got {samples_per_shard!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a directory: {out}")


def _run(kind: str, out: Path, entries: list[Entry], skipped: Counter, params: dict, meta: dict, fmt: str,
         samples_per_shard: int, workers: int, progress: bool, opener: Optional[Callable] = None) -> dict:
    if not entries:
        raise ValueError(f"no usable samples for {out} (skipped: {dict(sorted(skipped.items())) or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # left by an interrupted build
        stale.unlink(missing_ok=True)
    jobs = []
    for i, start in enumerate(range(0, len(entries), samples_per_shard)):
        chunk = entries[start:start + samples_per_shard]
        jobs.append({"kind": kind, "path": str(out / f"shard-{i:06d}.tar"), "entries": chunk, "params": params,
                     "digest": _digest(kind, params, chunk), "opener": opener})
    records: dict[int, dict] = {}
    pending = []
    for i, job in enumerate(jobs):
        record = _up_to_date(Path(job["path"]), job["digest"])
        if record is None:
            pending.append(i)
        else:
            records[i] = record
    from tqdm import tqdm

    with tqdm(total=len(jobs), initial=len(records), desc=f"vlpt shards {kind}", unit="shard",
              disable=not progress, dynamic_ncols=True) as bar:
        if workers == 1 or len(pending) <= 1:
            for i in pending:
                records[i] = _build_shard(jobs[i])
                bar.update(1)
        else:
            # spawn: workers never inherit the parent's threads or locks (torch, tokenizers, tests)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=ctx) as pool:
                futures = {pool.submit(_build_shard, jobs[i]): i for i in pending}
                for fut in as_completed(futures):
                    records[futures[fut]] = fut.result()
                    bar.update(1)
    for i in sorted(records):
        skipped.update(records[i].get("skipped", {}))
    skipped = Counter({k: v for k, v in skipped.items() if v})
    paths = [job["path"] for job in jobs]
    counts = [records[i]["num_samples"] for i in range(len(jobs))]
    manifest_meta = {**meta, "builder": kind, "params": params, "skipped": dict(sorted(skipped.items()))}
    pictures = fmt == PIXEL_FORMAT
    pairs = [records[i]["num_pairs"] for i in range(len(jobs))] if pictures else None
    manifest = write_manifest(out, paths, manifest_meta, counts, fmt=fmt, pairs=pairs)
    sizes = {k: sum(records[i][k] for i in records)
             for k in ("num_pairs", "picture_bytes", "picture_bytes_one_per_caption")} if pictures else {}
    return {**sizes,
        "out_dir": str(out),
        "manifest": str(out / MANIFEST_NAME),
        "format": fmt,
        "num_samples": manifest["num_samples"],
        "num_shards": len(jobs),
        "built": len(pending),
        "reused": len(jobs) - len(pending),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "skipped": dict(sorted(skipped.items())),
    }


# ---------------------------------------------------------------- the three builders

def build_coco_shards(captions: str | Path, images: str | Path, out: str | Path, *, samples_per_shard: int = 1000,
                      workers: int = 1, progress: bool = False,
                      max_image_pixels: int = DecodeLimits.max_image_pixels, allow_outside_root: bool = False) -> dict:
    """COCO-captions JSON + image folder -> pixel shards in `out` (one sample per picture, holding its
    captions; `samples_per_shard` pictures a shard); a summary dict, with the pairs and the picture bytes
    stored (`picture_bytes`) beside those one sample per caption would store.

    A `file_name` leading out of `images` is skipped ("path_outside_root") unless `allow_outside_root`.
    """
    out, images = Path(out), Path(os.path.abspath(images))
    _check_common(out, samples_per_shard, workers)
    _check_max_pixels(max_image_pixels)
    if not images.is_dir():
        raise ValueError(f"image folder not found: {images}")
    data = _load_json(Path(captions), "captions file")
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        raise ValueError(f"captions file {captions} is not COCO captions ({{'images': [...], 'annotations': [...]}})")
    rows, file_names, skipped = _parse_captions(data, captions)
    entries = []
    for image_id, caption, caption_id in rows:
        if image_id not in file_names:
            skipped["unknown_image_id"] += 1
            continue
        path, reason = _source_path(images, file_names[image_id], allow_outside_root)
        if reason:
            skipped[reason] += 1
            continue
        e = _image_entry(f"{_safe(image_id)}-{_safe(caption_id)}", path, image_id, caption, caption_id, skipped)
        if e is not None:
            entries.append(e)
    meta = {"source": "coco", "captions": str(Path(captions).resolve()), "images": str(images.resolve())}
    return _run("coco", out, _pictures(_dedupe(entries, skipped)), skipped, {"max_image_pixels": max_image_pixels},
                meta, PIXEL_FORMAT, samples_per_shard, workers, progress)


def build_region_shards(features: str | Path, captions: str | Path, out: str | Path, *, conf_th: float = 0.2,
                        min_bb: int = 10, max_bb: int = 100, samples_per_shard: int = 1000, workers: int = 1,
                        progress: bool = False, allow_outside_root: bool = False) -> dict:
    """`<image_id>.npz` region features + captions -> region shards in `out`; a summary dict.

    img_dim / label_dim and the fields stored (conf and soft_labels are optional) come from the
    first readable npz; files of other widths, or lacking one of its fields, are skipped.
    An image_id leading out of `features` (`../x`, `/x`) is skipped unless `allow_outside_root`.
    """
    out, features = Path(out), Path(os.path.abspath(features))
    _check_common(out, samples_per_shard, workers)
    if not features.is_dir():
        raise ValueError(f"feature folder not found: {features}")
    check_box_args(conf_th, min_bb, max_bb)
    rows, _, skipped = load_captions(captions)
    entries, stats = [], {}
    for image_id, caption, caption_id in rows:
        path, reason = _source_path(features, f"{image_id}.npz", allow_outside_root)
        if reason:
            skipped[reason] += 1
            continue
        if path not in stats:
            stats[path] = _stat(path)
        st = stats[path]
        if st is None:
            skipped["missing_npz"] += 1
            continue
        entries.append(Entry(f"{_safe(image_id)}-{_safe(caption_id)}", str(path), image_id, caption, caption_id,
                             st.st_size, st.st_mtime_ns))
    entries = _dedupe(entries, skipped)
    layout = _infer_dims(list(dict.fromkeys(e.source for e in entries))) if entries else (0, 0, REGION_FIELDS)
    meta = {"source": "regions", "captions": str(Path(captions).resolve()), "features": str(features.resolve())}
    return build_region_record_shards("regions", out, entries, skipped, layout, meta, conf_th=conf_th, min_bb=min_bb,
                                      max_bb=max_bb, samples_per_shard=samples_per_shard, workers=workers,
                                      progress=progress)


def check_box_args(conf_th: float, min_bb: int, max_bb: int) -> None:
    """The box-selection arguments of the region builders (`select_regions`)."""
    for name, v in (("min_bb", min_bb), ("max_bb", max_bb)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if min_bb > max_bb:
        raise ValueError(f"min_bb ({min_bb}) must not exceed max_bb ({max_bb})")
    if not np.isfinite(conf_th):
        raise ValueError(f"conf_th must be a finite number, got {conf_th!r}")


def build_region_record_shards(kind: str, out: Path, entries: list[Entry], skipped: Counter,
                               layout: tuple[int, int, tuple[str, ...]], meta: dict, *, conf_th: float, min_bb: int,
                               max_bb: int, samples_per_shard: int, workers: int, progress: bool,
                               opener: Optional[Callable] = None, reader_params: Optional[dict] = None) -> dict:
    """Region shards of planned `entries` (`kind` names the builder); a summary dict. `layout`: the
    dataset's (img_dim, label_dim, fields), from its first usable image. `opener(params)`: a context
    manager giving `load(entry) -> (arrays, None) | (None, skip reason)`, for sources other than an
    npz per image (data/region_formats); a picklable object, as worker processes call it.
    `reader_params`: what the reader needs besides (TSV field names, ...); they enter the plan digest."""
    img_dim, label_dim, fields = layout
    params = {"conf_th": float(conf_th), "min_bb": min_bb, "max_bb": max_bb, "img_dim": img_dim,
              "label_dim": label_dim, **(reader_params or {})}
    if tuple(fields) != REGION_FIELDS:
        params["fields"] = list(fields)
    meta = {**meta, "img_dim": img_dim, "label_dim": label_dim, "fields": list(fields)}
    return _run(kind, out, entries, skipped, params, meta, FORMAT, samples_per_shard, workers, progress, opener)


def text_lines(path: Path, skipped: Counter) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its end) of each non-blank line of a UTF-8 text file; a line
    that is not UTF-8 is counted as "bad_line" and left out."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skipped["bad_line"] += 1
                continue
            if line.strip():
                yield lineno, line


def build_tsv_shards(tsv: str | Path, out: str | Path, *, samples_per_shard: int = 1000, workers: int = 1,
                     progress: bool = False, max_image_pixels: int = DecodeLimits.max_image_pixels,
                     allow_outside_root: bool = False) -> dict:
    """`local_image_path<TAB>caption` lines -> pixel shards in `out`; a summary dict.

    Relative paths are resolved against the TSV's folder; a path leading out of it
    (absolute, `..`, a symlink) is skipped as "path_outside_root" unless
    `allow_outside_root`. The image_id is the normalised path as written
    (`./a/../x.jpg` -> `x.jpg`); key and caption_id are `line-<line number>`.
    Blank lines are ignored.
    """
    out, tsv = Path(out), Path(os.path.abspath(tsv))
    _check_common(out, samples_per_shard, workers)
    _check_max_pixels(max_image_pixels)
    if not tsv.is_file():
        raise ValueError(f"TSV file not found: {tsv}")
    skipped: Counter = Counter()
    entries = []
    for lineno, line in text_lines(tsv, skipped):
        image_path, sep, caption = line.partition("\t")
        if not sep or not image_path.strip():
            skipped["bad_line"] += 1
            continue
        reason = caption_reason(caption)
        if reason:
            skipped[reason] += 1
            continue
        image_id = Path(os.path.normpath(image_path)).as_posix()
        path, reason = _source_path(tsv.parent, image_id, allow_outside_root)
        if reason:
            skipped[reason] += 1
            continue
        key = f"line-{lineno:09d}"
        e = _image_entry(key, path, image_id, caption, key, skipped)
        if e is not None:
            entries.append(e)
    meta = {"source": "tsv", "tsv": str(tsv.resolve())}
    return _run("tsv", out, _pictures(entries), skipped, {"max_image_pixels": max_image_pixels}, meta,
                PIXEL_FORMAT, samples_per_shard, workers, progress)
