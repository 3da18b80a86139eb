"""Reading local weight files for model initialisation (UNITER, BERT, ViT), shared by
`trainer.models.convert` and `trainer.models.albef_init`.

Only local paths are read, nothing is downloaded. Weights are read with safetensors or
`torch.load(weights_only=True)`: a file can hold tensors, never code that runs on load.
Errors are ValueErrors of one line that name the file.
"""
from __future__ import annotations

import json
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Mapping, Sequence, Union

import torch
from safetensors import SafetensorError
from torch import Tensor

PathLike = Union[str, Path]

MAX_LISTED = 10
"""Keys `listed` names before it only counts the rest."""


def existing_path(path: PathLike, what: str, is_dir: bool = False) -> Path:
    """`path` as a Path if it is an existing file (a directory with `is_dir`), else a
    ValueError naming `what` (the setting it came from)."""
    p = Path(path)
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        kind = "directory" if is_dir else "file"
        raise ValueError(f"{what}: {p} is not an existing {kind} (only local paths are read; nothing is downloaded)")
    return p


def listed(keys: Sequence[str]) -> str:
    """`3 [a, b, c]`: the count and the first MAX_LISTED keys, for error messages and logs."""
    shown = ", ".join(keys[:MAX_LISTED])
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{len(keys)} [{shown}{more}]"


def rename_legacy_layernorm(key: str) -> str:
    """Old BERT/UNITER files name LayerNorm parameters `gamma`/`beta`: `weight`/`bias` instead."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def read_bert_weights(directory: Path) -> Dict[str, Tensor]:
    """The weights of a Hugging Face model directory: model.safetensors, else pytorch_model.bin."""
    st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


@contextmanager
def reading_weights(source: Path) -> Iterator[None]:
    """Turn the readers' errors into ValueErrors that name the file."""
    try:
        yield
    except pickle.UnpicklingError as e:
        # weights_only refused a non-tensor object (or the bytes are no pickle at all). Only
        # torch's reason is quoted: its advice to retry without weights_only is not ours.
        reason = re.search(r"Unsupported [^.\n]*", str(e))
        raise ValueError(f"{source}: refused to load: it holds objects other than tensors, or is no torch "
                         f"file ({reason.group(0) if reason else type(e).__name__}); re-save it as a plain "
                         "state dict of tensors or as model.safetensors") from e
    except (RuntimeError, EOFError, KeyError, OSError, SafetensorError) as e:
        raise ValueError(f"{source}: cannot read the weights ({type(e).__name__}: {e})") from e


def plain_state_dict(obj: object, source: Path) -> Dict[str, Tensor]:
    """name -> tensor, unwrapping the {"model": ...} / {"state_dict": ...} training checkpoints
    that DeiT and timm's training scripts write."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: not a state dict (expected a non-empty mapping of name -> tensor)")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: not a plain state dict; non-tensor entries {listed(bad)}")
    return dict(obj)


def read_config_json(d: Path) -> dict:
    """`d/config.json` as a dict; {} when there is none."""
    f = d / "config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e


WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
"""A BERT file's word-embedding key, after an optional `bert.` prefix."""


def word_embedding_rows(directory: PathLike) -> int:
    """Rows of the word embedding of a Hugging Face BERT directory, read cheaply: from the
    safetensors header, or a memory-mapped pytorch_model.bin (nothing else is loaded)."""
    d = existing_path(directory, "the BERT folder", is_dir=True)
    st, pt = d / "model.safetensors", d / "pytorch_model.bin"
    with reading_weights(d):
        if st.is_file():
            from safetensors import safe_open

            with safe_open(str(st), framework="pt") as f:
                key = next((k for k in f.keys() if k.removeprefix("bert.") == WORD_EMBEDDINGS), None)
                shape = f.get_slice(key).get_shape() if key else None
        elif pt.is_file():
            try:
                obj = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
                obj = torch.load(pt, map_location="cpu", weights_only=True)
            sd = plain_state_dict(obj, pt)
            key = next((k for k in sd if str(k).removeprefix("bert.") == WORD_EMBEDDINGS), None)
            shape = tuple(sd[key].shape) if key else None
        else:
            raise ValueError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    if not shape:
        raise ValueError(f"{d}: no [bert.]{WORD_EMBEDDINGS} in its weights; expected a Hugging Face BERT")
    return int(shape[0])
