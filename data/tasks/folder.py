"""Task folders (docs/downstream.md, "Task folders"): what a builder writes and a run reads.

    <dir>/manifest.json   {"format": "vlpt-task-v1", "task": "vqa", "split": "train",
                           "num_examples": n, "sha256": <of examples.jsonl>,
                           "labels": [answer strings] (VQA; the head's A = len(labels)),
                           "meta": {...} (the builder's sources and settings)}
    <dir>/examples.jsonl  one example per line (data/tasks/records.py)

Region features are not in the folder: the run joins them by image id from the region shard
folders `finetune.features` names (data/tasks/features.py), so an image is stored once however
many questions, statements or captions refer to it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from data.atomic_write import write_atomic
from data.tasks.records import MAX_LINE_BYTES, TASKS, parse_line

TASK_FORMAT = "vlpt-task-v1"
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
MAX_MANIFEST_BYTES = 64 << 20
"""A manifest holds the answer vocabulary (VQA: 3,129 strings) and little else."""


@dataclass
class TaskFolder:
    task: str
    split: str
    path: str
    examples: list[dict]
    labels: Optional[list[str]] = None
    meta: dict = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Lines not used, by reason (data/tasks/records.py)."""
    seen: int = 0
    """Lines read (good and bad)."""


def write_task_folder(out: str | Path, task: str, split: str, examples: Iterable[dict],
                      labels: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> Path:
    """Write examples.jsonl and manifest.json (last, atomically: a folder with a manifest is complete)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest, n = hashlib.sha256(), 0
    with open(out / EXAMPLES, "wb") as f:
        for r in examples:
            line = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
            n += 1
    manifest = {"format": TASK_FORMAT, "task": task, "split": split, "num_examples": n,
                "sha256": digest.hexdigest(), "meta": meta or {}}
    if labels is not None:
        manifest["labels"] = list(labels)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    return out


def _read_manifest(path: Path, where: str) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{where}: no {MANIFEST} in {path} (build the task folder with `vlpt tasks ...` or "
                         "`vlpt demo-data --tasks`)")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{where}: {file} is over {MAX_MANIFEST_BYTES >> 20} MiB; not a task manifest")
    try:
        m = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: {file} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != TASK_FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{where}: {file} has format {found!r}, expected {TASK_FORMAT!r} (a task folder)")
    if m.get("task") not in TASKS:
        raise ValueError(f"{where}: {file} names task {m.get('task')!r}; expected one of {', '.join(TASKS)}")
    labels = m.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(a, str) for a in labels)):
        raise ValueError(f"{where}: {file} 'labels' must be a list of strings")
    return m


def read_task_manifest(path: str | Path, where: str = "task folder") -> dict:
    """The manifest of a task folder (ValueError naming `where` when it is not one)."""
    return _read_manifest(Path(path), where)


def read_task_folder(path: str | Path, where: str = "task folder", task: Optional[str] = None) -> TaskFolder:
    """The manifest and every usable example; bad lines are counted by reason, never raised."""
    root = Path(path)
    m = _read_manifest(root, where)
    if task is not None and m["task"] != task:
        raise ValueError(f"{where}: {root} holds {m['task']!r} examples but the run fine-tunes {task!r}")
    labels = m.get("labels")
    num_labels = len(labels) if labels else 0
    file = root / EXAMPLES
    if not file.is_file() or file.is_symlink():
        raise ValueError(f"{where}: {file} is missing or not a regular file")
    folder = TaskFolder(m["task"], str(m.get("split", "")), str(root), [], labels, m.get("meta") or {})
    skipped: Counter = Counter()
    with open(file, "rb") as f:
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            if len(line) > MAX_LINE_BYTES:  # drop the rest of an over-long line unread into memory
                while line and not line.endswith(b"\n"):
                    line = f.readline(MAX_LINE_BYTES + 1)
                skipped["line_too_long"] += 1
                folder.seen += 1
                continue
            if not line.strip():
                continue
            folder.seen += 1
            r, reason = parse_line(line, m["task"], num_labels)
            if reason:
                skipped[reason] += 1
            else:
                folder.examples.append(r)
    folder.skipped = dict(sorted(skipped.items()))
    return folder
