"""The data side every fine-tuning recipe on task folders shares (docs/downstream.md, "Task folders"): reading
the folders, keeping the examples whose images the store holds, the start-up line, and the training loader
at its resumed position. The store is the family's: region features (UNITER) or pictures (ALBEF)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

from data.tasks.folder import TaskFolder, read_task_folder
from data.tasks.loader import DownstreamLoader, known_images, steps_from_state
from trainer.config_files import ConfigError

log = logging.getLogger("vlpt")


def read_folders(cfg, task: str) -> tuple[Optional[TaskFolder], Optional[TaskFolder]]:
    """finetune.train and finetune.val (None where unset)."""
    f = cfg.finetune
    return tuple(read_task_folder(path, f"{key}={path}", task) if path else None  # type: ignore[return-value]
                 for key, path in (("finetune.train", f.train), ("finetune.val", f.val)))


def keep_known(folders: tuple[Optional[TaskFolder], ...], store, cfg) -> None:
    """Drop (and count) the examples whose images `store` does not index; refuse a training split left empty."""
    for folder in folders:
        if folder is not None:
            folder.examples = known_images(folder.examples, store, folder.skipped)
    train = folders[0]
    if train is not None and not train.examples:
        raise ValueError(f"finetune.train={cfg.finetune.train}: no usable example (skipped: {train.skipped}); "
                         "check that finetune.features holds its images")


def answer_vocabulary(folders: tuple[Optional[TaskFolder], ...]) -> list[str]:
    """VQA's answer vocabulary: the folders' `labels`, the same in each."""
    lists = [f.labels for f in folders if f is not None]
    if not lists or any(not labels for labels in lists):
        raise ValueError("finetune: a vqa task folder has no answer vocabulary (`labels` in its manifest); "
                         "rebuild it with `vlpt tasks vqa`")
    if any(labels != lists[0] for labels in lists):
        raise ValueError("finetune.train and finetune.val have different VQA answer vocabularies; build both "
                         "with the same --ans2label")
    return lists[0]


def report(task: str, folders: tuple[Optional[TaskFolder], ...], store) -> None:
    parts = [f"{name} {len(folder.examples):,} examples (skipped {folder.skipped or 'none'})"
             for name, folder in zip(("train", "val"), folders) if folder]
    log.info("fine-tuning %s: %s; %d images indexed in finetune.features%s", task, "; ".join(parts), len(store),
             f" (skipped {dict(store.skipped)})" if store.skipped else "")


def task_loader(cfg, task: str, folder: Optional[TaskFolder], items: list[dict], store, collate: Callable,
                layout, rank: int, positions: dict) -> dict:
    """{task: DownstreamLoader} of this rank's streams at the resumed position."""
    if folder is None:
        raise ConfigError("finetune.train is not set: nothing to fine-tune on (vlpt evaluate scores "
                          "finetune.val without it)")
    streams = range(rank * layout.grad_accum, (rank + 1) * layout.grad_accum)
    try:
        steps = steps_from_state(positions.get(task), task, layout.n_streams, streams)
        loader = DownstreamLoader(items, store, collate, key=task, seed=cfg.train.seed, n_streams=layout.n_streams,
                                  micro_batch=layout.micro_batch_size, streams=streams, steps_done=steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if rank == 0 and steps == 0:  # the folders' bad lines, counted once for the run
        loader.skip_counts.update(folder.skipped)
        loader.seen += folder.seen
    return {task: loader}


def evaluation_config(cfg, split: Optional[str]):
    """`vlpt evaluate`'s config: finetune.val = `split` (default: the config's), nothing trained or initialised."""
    split = split or cfg.finetune.val
    if not split:
        raise ValueError("vlpt evaluate: give --split <task folder> or set finetune.val")
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, val=split, train=None, init_from=None))
