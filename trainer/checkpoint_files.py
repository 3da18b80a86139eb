"""Checkpoint files on disk: which names may exist, and reading and writing them safely.

Where a checkpoint file may live is decided by `checkpoint_file_path` alone: a
`step_<8 digits>` tag and a known file name, so a name from elsewhere (an S3 listing,
a `latest` pointer) cannot reach outside the checkpoint folder.

Nothing is unpickled freely on load: every `.pt` file goes through `load_tensors`
(`weights_only=True`, allowing tensors, plain containers and the four small DeepSpeed
records its optimizer states hold), DeepSpeed's own loads included.

The layout, and how a save publishes a checkpoint, are described in `trainer.checkpoint`.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
from typing import Any, Optional

import torch

from data.atomic_write import write_atomic

log = logging.getLogger("trainer.checkpoint")  # one logger for the checkpoint modules, as before the split

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
TAG_PATTERN = re.compile(r"step_[0-9]{8}")
# Every file a checkpoint folder holds: DeepSpeed's model states (ZeRO 0-2 / ZeRO-3 per
# rank), its ZeRO optimizer partitions (bf16_ with its bf16 optimizer), the recovery scripts
# it copies next to them (never run by us), then ours.
CHECKPOINT_FILE_PATTERN = re.compile(
    r"mp_rank_[0-9]{2}_model_states\.pt"
    r"|zero_pp_rank_[0-9]+_mp_rank_[0-9]{2}_model_states\.pt"
    r"|(bf16_)?zero_pp_rank_[0-9]+_mp_rank_[0-9]{2}_optim_states\.pt"
    r"|zero_to_fp32\.py|zero_to_torch\.py"
    r"|trainer_state\.json|config\.yaml|rng_rank[0-9]+\.pt|teacher\.pt")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file pickles objects beyond tensors and plain data: refused, never loaded."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file is truncated, damaged or missing: an older checkpoint may still do."""


# ---------------------------------------------------------------------------- names and paths


def check_tag(tag: str, source: str) -> str:
    """`tag` if it is a checkpoint tag (`step_` and 8 digits), else a one-line ValueError
    naming `source`, where the tag came from."""
    if not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"{source} names {tag!r}, which is not a checkpoint tag (step_ and 8 digits); "
                         "refusing to use it")
    return tag


def checkpoint_file_path(root: str, tag: str, name: str, source: str) -> str:
    """The path of checkpoint file `name` of `tag` under `root`; a one-line ValueError naming
    `source` unless `tag` is a checkpoint tag and `name` a known checkpoint file name."""
    check_tag(tag, source)
    if not CHECKPOINT_FILE_PATTERN.fullmatch(name):
        raise ValueError(f"{source} holds {tag}/{name!r}, which is not a file of a checkpoint; "
                         "refusing to use it")
    folder = os.path.join(root, tag)
    path = os.path.join(folder, name)
    assert os.path.dirname(os.path.normpath(path)) == os.path.normpath(folder), path  # no separator matched
    return path


def checkpoint_root(run_dir: str) -> str:
    """`<run_dir>/checkpoints`, the folder holding every checkpoint of a run."""
    return os.path.join(run_dir, "checkpoints")


def step_tag(step: int) -> str:
    """The tag of the checkpoint of optimizer step `step`: `step_` and 8 digits."""
    return f"step_{step:08d}"


def list_complete(root: str) -> list[str]:
    """Tags of the complete checkpoints under `root` (those with a trainer state), oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root)
            if TAG_PATTERN.fullmatch(t) and os.path.isfile(os.path.join(root, t, STATE_FILE))]
    return sorted(tags)


# ---------------------------------------------------------------------------- the `latest` pointer


def write_latest(root: str, tag: str) -> None:
    """Point `root/latest` at `tag` (atomically)."""
    write_atomic(os.path.join(root, "latest"), tag)


def _pointer_tag(root: str) -> Optional[str]:
    """The tag `root/latest` names (checked to be a tag), or None without a pointer."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return check_tag(f.read().strip(), pointer)


def latest_tag(run_dir: str) -> Optional[str]:
    """The tag `latest` names, or None without a pointer; a ValueError when it names no
    complete checkpoint."""
    root = checkpoint_root(run_dir)
    tag = _pointer_tag(root)
    if tag is not None and not os.path.isfile(os.path.join(root, tag, STATE_FILE)):
        raise ValueError(f"{os.path.join(root, 'latest')} names {tag!r}, which is not a complete checkpoint; "
                         f"point it at one of {list_complete(root)} or delete it to start fresh")
    return tag


def resume_candidates(run_dir: str) -> list[str]:
    """Tags to try on resume, best first: the one `latest` names (validated), then the other
    complete checkpoints newest first. The same list on every rank (a shared folder)."""
    root = checkpoint_root(run_dir)
    named = _pointer_tag(root)
    if named is None:
        return []
    pointer = os.path.join(root, "latest")
    older = [t for t in reversed(list_complete(root)) if t != named]
    if not os.path.isfile(os.path.join(root, named, STATE_FILE)):
        if not older:
            raise ValueError(f"{pointer} names {named!r}, which is not a complete checkpoint, and there is "
                             "no other; delete it to start fresh")
        log.warning("%s names %s, which is not a complete checkpoint; trying %s", pointer, named, older[0])
        return older
    return [named, *older]


# ---------------------------------------------------------------------------- reading and writing files


# Plain records inside DeepSpeed's optimizer-state files (loss scaler settings, the ZeRO
# stage, bf16 fragment addresses): data only, rebuilt without running their code.
DEEPSPEED_RECORDS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def deepspeed_records() -> list:
    """The classes named in DEEPSPEED_RECORDS, imported: the globals `load_tensors` allows."""
    records = []
    for dotted in DEEPSPEED_RECORDS:
        module, _, name = dotted.rpartition(".")
        records.append(getattr(importlib.import_module(module), name))
    return records


# Taken at import: a caller may route `torch.load` itself through `load_tensors` (DeepSpeed's
# consolidation in `vlpt convert export` would unpickle anything otherwise).
_TORCH_LOAD = torch.load


def load_tensors(path: str, map_location="cpu", **kwargs) -> Any:
    """`torch.load` with `weights_only=True` and DeepSpeed's records allowed: every `.pt` file
    of a checkpoint is read here. UnsafeCheckpointError when it pickles other objects,
    UnreadableCheckpointError when it is truncated, damaged or missing (one line each)."""
    try:
        with torch.serialization.safe_globals(deepspeed_records()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # torch advises turning weights_only off; keep only the offending global.
        unsafe = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln), None)
        if unsafe:
            raise UnsafeCheckpointError(f"{path} holds objects that are not tensors or plain data; refusing to "
                                        f"unpickle it ({unsafe})") from None
        raise UnreadableCheckpointError(f"{path} cannot be read ({_first_line(e)}); it is truncated or "
                                        "damaged") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # A cut or damaged file fails anywhere in the zip reader or the unpickler.
        raise UnreadableCheckpointError(f"{path} cannot be read ({_first_line(e)}); it is truncated or "
                                        "damaged") from None


def save_tensors(obj: Any, path: str) -> None:
    """`torch.save` through a Python file, so a failed write surfaces as the OSError the
    system gave (ENOSPC, EFBIG, EIO) instead of torch's `unexpected pos`."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, os.strerror(cause.errno), path) from None
        raise
    except OSError as e:  # e.g. the buffered tail failing at close names no file
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise


def read_trainer_state(root: str, tag: str) -> dict:
    """The trainer state (`trainer_state.json`) of checkpoint `tag` under `root`;
    UnreadableCheckpointError (one line) when it is missing or damaged."""
    state_file = checkpoint_file_path(root, tag, STATE_FILE, root)
    try:
        with open(state_file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableCheckpointError(f"{state_file} cannot be read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
