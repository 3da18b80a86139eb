"""Bad sample contents, built on the fly and small on disk (tests only): captions that do not
encode, decompression bombs (pictures and npz) and values that leave the model's range."""
from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np

from data.demo_scenes import LABEL_DIM
from data.shards import encode_npz
from tests.bad_input_data import IMG_DIM

GOOD_CAPTION = "a red cube left of a blue ball"
BAD_CAPTIONS = {
    "lone_surrogate": "a red \ud800 cube",
    "nul": "a red \x00 cube",
    "c0_bell": "a red \x07 cube",
    "c1_control": "a red \x9b cube",
}
"""Captions that decoding must skip as "bad_caption" (JSON-escaped on disk, so valid JSON)."""
WHITESPACE_CAPTION = "a red cube\tleft of\na blue ball\r"


def meta_json(key: str, caption: str = GOOD_CAPTION) -> bytes:
    """The sample's JSON with non-ASCII escaped: a lone surrogate is then valid JSON text."""
    return json.dumps({"image_id": f"img-{key}", "caption": caption, "caption_id": key}).encode("ascii")


def region_arrays(n: int = 3, **override) -> dict[str, np.ndarray]:
    arrays = {"features": np.ones((n, IMG_DIM), np.float16),
              "norm_bb": np.tile(np.array([0.1, 0.2, 0.5, 0.6, 0.4, 0.4], np.float32), (n, 1)),
              "conf": np.ones(n, np.float32),
              "soft_labels": np.full((n, LABEL_DIM), 1.0 / LABEL_DIM, np.float16)}
    arrays.update(override)
    return arrays


def region_raw(key: str = "k", caption: str = GOOD_CAPTION, npz: bytes | None = None, **override) -> dict:
    """A raw region sample as iter_shard yields it; `override` replaces arrays."""
    return {"__key__": key, "json": meta_json(key, caption),
            "npz": npz if npz is not None else encode_npz(region_arrays(**override))}


# ---------------------------------------------------------------- pictures

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A real, fully decodable single-colour greyscale PNG: tiny on disk, width*height bytes
    once decoded (3x that as RGB)."""
    row = b"\x00" + b"\x00" * width  # filter type 0, then the pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def small_png(side: int = 32, colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pixel_raw(key: str = "k", caption: str = GOOD_CAPTION, png: bytes | None = None) -> dict:
    return {"__key__": key, "json": meta_json(key, caption), "png": png if png is not None else small_png()}


# ---------------------------------------------------------------- npz

def _npy_header(shape: tuple, dtype=np.float16) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_deflate_bomb(inflated_bytes: int = 1 << 30) -> bytes:
    """A region npz whose `features.npy` is `inflated_bytes` of zeros stored with deflate
    (about 1/1000 of that on disk); its declared size is true."""
    rows = inflated_bytes // (IMG_DIM * 2)
    small = region_arrays()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("features.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((rows, IMG_DIM)))
            block = bytes(1 << 22)
            for _ in range(rows * IMG_DIM * 2 // len(block)):
                f.write(block)
            f.write(bytes(rows * IMG_DIM * 2 % len(block)))
        for k in ("norm_bb", "conf", "soft_labels"):
            z.writestr(f"{k}.npy", _array_bytes(small[k]))
    return buf.getvalue()


def npz_header_bomb(rows: int = 1 << 26) -> bytes:
    """A region npz whose stored `features.npy` header declares `rows` x IMG_DIM fp16 (2 GiB
    by default) but holds a few bytes of data."""
    small = region_arrays()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("features.npy", _npy_header((rows, IMG_DIM)) + bytes(64))
        for k in ("norm_bb", "conf", "soft_labels"):
            z.writestr(f"{k}.npy", _array_bytes(small[k]))
    return buf.getvalue()


def _array_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
