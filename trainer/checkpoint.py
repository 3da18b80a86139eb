"""Checkpoints: DeepSpeed state + our trainer state, config and per-rank RNG.

Layout of `<run_dir>/checkpoints/`:

    step_00000400/            DeepSpeed files (model, optimizer, LR schedule)
        trainer_state.json    step, data positions, MLflow run id (written last)
        config.yaml           the resolved config of the run
        rng_rank{r}.pt        torch / numpy / python RNG of rank r (tensors and ints only)
        teacher.pt            ALBEF: the momentum model and its queues (the same on every rank)
    latest                    name of the newest complete checkpoint

Every rank writes into `.tmp-step_00000400/`; once all files and then
`trainer_state.json` are on disk, rank 0 renames the folder to `step_00000400`
and only then replaces `latest` (atomically). A save killed at any point leaves
the previous checkpoint complete and `latest` pointing to it; the next save
removes the leftover temp folder.

Nothing is unpickled freely on load: every `.pt` file goes through `load_tensors`
(`weights_only=True`, allowing tensors, plain containers and the four small DeepSpeed
records its optimizer states hold), DeepSpeed's own loads included.

Where a checkpoint file may live is decided by `checkpoint_file_path` alone: a
`step_<8 digits>` tag and a known file name, so a name from elsewhere (an S3 listing,
a `latest` pointer) cannot reach outside the checkpoint folder.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from trainer.distributed import DistInfo, all_gather_objects, barrier
from trainer.errors import RunAborted

log = logging.getLogger(__name__)

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


class CheckpointSaveError(RunAborted):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous one is intact."""


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
    return os.path.join(run_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)  # a half-written file must not stay beside `latest`
        raise
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, run_dir: str, step: int, trainer_state: dict, config_yaml: str,
                    keep_last: int, dist_info: DistInfo, replicated: Optional[dict[str, nn.Module]] = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory.

    `replicated`: modules outside the engine that every rank holds whole and alike (ALBEF's
    teacher), saved once by rank 0 as `<name>.pt`. A write that fails on any rank (disk
    full, quota) ends the run on every rank with CheckpointSaveError; the temp folder is
    removed and the previous checkpoint stays as it was."""
    root, tag = checkpoint_root(run_dir), step_tag(step)
    if dist_info.is_main:
        remove_unfinished(root)
    barrier()
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    _agree_saved(root, tag, dist_info, _attempt(_write_rank_files, root, tag, engine, dist_info, replicated))
    error = None
    if dist_info.is_main:
        error = _attempt(_complete, root, tag, trainer_state, config_yaml, keep_last)
    _agree_saved(root, tag, dist_info, error)
    return os.path.join(root, tag)


def _write_rank_files(root: str, tag: str, engine, dist_info: DistInfo, replicated) -> None:
    tmp = os.path.join(root, TMP_PREFIX + tag)
    writer = engine.checkpoint_engine
    writer.failed_write = None
    engine.save_checkpoint(root, tag=TMP_PREFIX + tag, save_latest=False)
    if writer.failed_write is not None:
        raise writer.failed_write
    save_tensors(rng_state(), os.path.join(tmp, f"rng_rank{dist_info.rank}.pt"))
    if dist_info.is_main:
        for name, module in (replicated or {}).items():
            save_tensors(module.state_dict(), os.path.join(tmp, f"{name}.pt"))


def _complete(root: str, tag: str, trainer_state: dict, config_yaml: str, keep_last: int) -> None:
    """Rank 0, once every rank's files are written: our files, then publish and prune."""
    tmp = os.path.join(root, TMP_PREFIX + tag)
    _write_atomic(os.path.join(tmp, "config.yaml"), config_yaml)
    _write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(trainer_state, indent=1))
    _publish(root, tag)
    prune_checkpoints(root, keep_last)


def _attempt(fn, root: str, tag: str, *args) -> Optional[str]:
    """None if `fn(root, tag, *args)` ran, else the OSError it raised as one line, naming the
    checkpoint's temp folder where the error names no file (a buffered write failing at close)."""
    try:
        fn(root, tag, *args)
    except OSError as e:
        return str(e) if e.filename else f"{e}: {os.path.join(root, TMP_PREFIX + tag)!r}"
    return None


def _agree_saved(root: str, tag: str, dist_info: DistInfo, error: Optional[str]) -> None:
    """Collective: raise CheckpointSaveError on every rank if a write failed on any."""
    failed = [(rank, e) for rank, e in enumerate(all_gather_objects(error)) if e]
    if not failed:
        return
    tmp = os.path.join(root, TMP_PREFIX + tag)
    if dist_info.is_main and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    barrier()
    rank, reason = failed[0]
    previous = latest_tag(os.path.dirname(root))
    if previous == tag:  # published; only pruning older checkpoints failed
        raise CheckpointSaveError(f"checkpoint {tag} saved, but removing older ones failed (rank {rank}: "
                                  f"{reason}); fix the error, then run the same command to resume")
    kept = f"`latest` still names {previous}, which is intact" if previous else "there is no earlier checkpoint"
    raise CheckpointSaveError(f"checkpoint {tag} not saved (rank {rank}: {reason}); {kept}; free space or "
                              "fix the error, then run the same command to resume")


def _publish(root: str, tag: str) -> None:
    """Rename the finished temp folder into place, then point `latest` at it."""
    tmp, path = os.path.join(root, TMP_PREFIX + tag), os.path.join(root, tag)
    if os.path.isdir(path):
        # The same step saved again: an older layout's leftover, a damaged checkpoint a resume
        # fell back from, or a resumed run with no step left (the same state). Moved aside
        # first, so `path` is never half deleted; `remove_unfinished` clears a leftover.
        old = os.path.join(root, f"{TMP_PREFIX}replaced-{tag}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync_dir(root)
    write_latest(root, tag)


def write_latest(root: str, tag: str) -> None:
    _write_atomic(os.path.join(root, "latest"), tag)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_unfinished(root: str) -> None:
    """Delete temp folders of saves that were killed before they completed."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX):
                log.warning("removing %s: a checkpoint save that did not complete", name)
                shutil.rmtree(os.path.join(root, name))


def list_complete(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root)
            if TAG_PATTERN.fullmatch(t) and os.path.isfile(os.path.join(root, t, STATE_FILE))]
    return sorted(tags)


def prune_checkpoints(root: str, keep_last: int) -> None:
    for tag in list_complete(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=False)


def _pointer_tag(root: str) -> Optional[str]:
    """The tag `root/latest` names (checked to be a tag), or None without a pointer."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return check_tag(f.read().strip(), pointer)


def latest_tag(run_dir: str) -> Optional[str]:
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


# Plain records inside DeepSpeed's optimizer-state files (loss scaler settings, the ZeRO
# stage, bf16 fragment addresses): data only, rebuilt without running their code.
DEEPSPEED_RECORDS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_records() -> list:
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
        with torch.serialization.safe_globals(_deepspeed_records()):
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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


@functools.cache
def _weights_only_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors(path, map_location=map_location)

        failed_write: Optional[OSError] = None

        def save(self, state_dict, path: str):
            # A failed write is held until DeepSpeed's save returns (`_write_rank_files` raises
            # it): raised here, it would skip DeepSpeed's closing barrier on this rank alone and
            # leave the ranks waiting in different collectives.
            try:
                save_tensors(state_dict, path)
            except OSError as e:
                self.failed_write = self.failed_write or e

    return TorchCheckpointEngine, WeightsOnlyCheckpointEngine


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading through `load_tensors` and saving
    through `save_tensors`."""
    torch_engine, weights_only = _weights_only_engine_class()
    if isinstance(engine.checkpoint_engine, weights_only):
        return engine.checkpoint_engine
    assert isinstance(engine.checkpoint_engine, torch_engine), type(engine.checkpoint_engine)
    return weights_only(engine._config)


def load_checkpoint(engine, run_dir: str, tag: str, dist_info: DistInfo,
                    replicated: Optional[dict[str, nn.Module]] = None) -> dict:
    """Collective. Restores engine state (and the `replicated` modules save_checkpoint
    wrote) and returns the trainer state; RNG is returned separately by `load_rng` so the
    caller restores it last."""
    root = checkpoint_root(run_dir)
    check_tag(tag, root)
    model_states = engine._get_ckpt_name(root, tag)  # this rank's file; DeepSpeed asserts if it is missing
    if not os.path.isfile(model_states):
        raise UnreadableCheckpointError(f"{model_states} is missing")
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise UnreadableCheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    for name, module in (replicated or {}).items():
        file = checkpoint_file_path(root, tag, f"{name}.pt", root)
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint {os.path.join(root, tag)} has no {name}.pt: it was not written by a "
                             f"run of this model; start a new train.run_dir")
        module.load_state_dict(load_tensors(file))
    state_file = checkpoint_file_path(root, tag, STATE_FILE, root)
    try:
        with open(state_file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableCheckpointError(f"{state_file} cannot be read ({_first_line(e)})") from None


def load_newest_usable(engine, run_dir: str, dist_info: DistInfo,
                       replicated: Optional[dict[str, nn.Module]] = None) -> Optional[tuple[str, dict, Optional[dict]]]:
    """Collective. (tag, trainer state, this rank's RNG) of the newest checkpoint every rank
    could read, trying `resume_candidates` in order; None when there is none to resume.

    A truncated or damaged file on any rank moves every rank on to the next older tag (the
    ranks agree through one all-gather per tag, so they cannot diverge); a file that pickles
    objects is refused outright, as is a run dir where no checkpoint is usable."""
    tags = resume_candidates(run_dir)
    failures = []
    for tag in tags:
        outcome = None
        try:
            saved = load_checkpoint(engine, run_dir, tag, dist_info, replicated)
            rng = load_rng(run_dir, tag, dist_info.rank)
        except ValueError as e:
            outcome = (isinstance(e, UnsafeCheckpointError), str(e))
        failed = [o for o in all_gather_objects(outcome) if o]
        if not failed:
            return tag, saved, rng
        unsafe = [message for is_unsafe, message in failed if is_unsafe]
        if unsafe:
            raise UnsafeCheckpointError(unsafe[0])
        failures.append(f"{tag}: {failed[0][1]}")
        if dist_info.is_main:
            log.warning("checkpoint %s is not usable (%s); trying the previous one", tag, failed[0][1])
    if not tags:
        return None
    raise UnreadableCheckpointError(f"no usable checkpoint in {checkpoint_root(run_dir)}: {'; '.join(failures)}; "
                                    "restore the files or choose a new train.run_dir")


def load_rng(run_dir: str, tag: str, rank: int) -> Optional[dict]:
    """This rank's RNG state, or None when the checkpoint came from a smaller world."""
    root = checkpoint_root(run_dir)
    path = checkpoint_file_path(root, tag, f"rng_rank{rank}.pt", root)
    if not os.path.isfile(path):
        return None
    return load_tensors(path)
