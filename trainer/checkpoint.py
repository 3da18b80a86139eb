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

Which files a checkpoint may hold, the `latest` pointer, and reading and writing `.pt`
files without unpickling anything but tensors and plain data: `trainer.checkpoint_files`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from data.atomic_write import write_atomic
from trainer.checkpoint_files import (
    STATE_FILE, TMP_PREFIX, UnreadableCheckpointError, UnsafeCheckpointError, check_tag, checkpoint_file_path,
    checkpoint_root, latest_tag, list_complete, load_tensors, read_trainer_state, resume_candidates, save_tensors,
    step_tag, write_latest,
)
from trainer.distributed import DistInfo, all_gather_objects, barrier
from trainer.errors import RunAborted

log = logging.getLogger(__name__)


class CheckpointSaveError(RunAborted):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous one is intact."""


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
    write_atomic(os.path.join(tmp, "config.yaml"), config_yaml)
    write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(trainer_state, indent=1))
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


def prune_checkpoints(root: str, keep_last: int) -> None:
    for tag in list_complete(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=False)


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
    return read_trainer_state(root, tag)


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
