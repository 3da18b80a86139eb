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

Nothing is unpickled freely on load: our own files are JSON or tensors read with
`weights_only=True`, and DeepSpeed's files go through `WeightsOnlyCheckpointEngine`,
which allows tensors, plain containers and the four small DeepSpeed records its
optimizer states hold.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from trainer.distributed import DistInfo, barrier

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
    teacher), saved once by rank 0 as `<name>.pt`."""
    root, tag = checkpoint_root(run_dir), step_tag(step)
    tmp, path = os.path.join(root, TMP_PREFIX + tag), os.path.join(root, tag)
    if dist_info.is_main:
        remove_unfinished(root)
    barrier()
    engine.save_checkpoint(root, tag=TMP_PREFIX + tag, save_latest=False)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist_info.rank}.pt"))
    if dist_info.is_main:
        for name, module in (replicated or {}).items():
            torch.save(module.state_dict(), os.path.join(tmp, f"{name}.pt"))
    barrier()
    if dist_info.is_main:
        _write_atomic(os.path.join(tmp, "config.yaml"), config_yaml)
        _write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(trainer_state, indent=1))
        _publish(root, tag)
        prune_checkpoints(root, keep_last)
    barrier()
    return path


def _publish(root: str, tag: str) -> None:
    """Rename the finished temp folder into place, then point `latest` at it."""
    tmp, path = os.path.join(root, TMP_PREFIX + tag), os.path.join(root, tag)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        # Same step saved again (a resumed run with no step left): the model has not
        # moved since, so the complete checkpoint already there stays.
        log.info("checkpoint %s already exists; keeping it", tag)
        shutil.rmtree(tmp)
    else:
        if os.path.isdir(path):
            shutil.rmtree(path)  # an incomplete folder of an older layout
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
            if t.startswith("step_") and os.path.isfile(os.path.join(root, t, STATE_FILE))]
    return sorted(tags)


def prune_checkpoints(root: str, keep_last: int) -> None:
    for tag in list_complete(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=False)


def latest_tag(run_dir: str) -> Optional[str]:
    root = checkpoint_root(run_dir)
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(root, tag, STATE_FILE)):
        raise ValueError(f"{pointer} names {tag!r}, which is not a complete checkpoint; "
                         f"point it at one of {list_complete(root)} or delete it to start fresh")
    return tag


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


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_records()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                # torch's message advises weights_only=False; keep only the offending global.
                reason = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln),
                              "not loadable with weights_only=True")
                raise ValueError(f"{path} holds objects that are not tensors or plain data; refusing to "
                                 f"unpickle it ({reason})") from None

    assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine), type(engine.checkpoint_engine)
    return WeightsOnlyCheckpointEngine(engine._config)


def load_checkpoint(engine, run_dir: str, tag: str, dist_info: DistInfo,
                    replicated: Optional[dict[str, nn.Module]] = None) -> dict:
    """Collective. Restores engine state (and the `replicated` modules save_checkpoint
    wrote) and returns the trainer state; RNG is returned separately by `load_rng` so the
    caller restores it last."""
    root = checkpoint_root(run_dir)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    for name, module in (replicated or {}).items():
        file = os.path.join(root, tag, f"{name}.pt")
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint {os.path.join(root, tag)} has no {name}.pt: it was not written by a "
                             f"run of this model; start a new train.run_dir")
        module.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    with open(os.path.join(root, tag, STATE_FILE)) as f:
        return json.load(f)


def load_rng(run_dir: str, tag: str, rank: int) -> Optional[dict]:
    """This rank's RNG state, or None when the checkpoint came from a smaller world."""
    path = os.path.join(checkpoint_root(run_dir), tag, f"rng_rank{rank}.pt")
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
