"""`vlpt demo-finetune` (`make demo-finetune`, `make demo-finetune-albef`): each demo task of a model family
fine-tuned from its demo pretraining checkpoint and from scratch for the same steps, and a table of their
held-out metrics against chance (docs/downstream.md, "Demo tasks", "ALBEF retrieval")."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from trainer.config import load_config

@dataclass(frozen=True)
class DemoFamily:
    """One model family's demo fine-tuning: its configs, tasks and the metric of each the table compares."""

    config_name: str
    """`configs/finetune/<config_name.format(task)>`."""
    headline: dict[str, str]
    """task -> metric (docs/downstream.md, "Evaluation and metrics"); its keys are the family's demo tasks."""
    pretrained_by: str
    """The command that made the checkpoint the runs start from."""
    prepared_by: dict[str, str] = field(default_factory=dict)
    """task -> a step run first from the same start (pretrained or scratch), whose run the task then starts from
    (ALBEF's NLVR2 after text assignment)."""


FAMILIES = {
    "uniter": DemoFamily("demo-{}.yaml", {"vqa": "score", "ve": "acc", "retrieval": "img_r1", "nlvr2": "acc",
                                          "re": "index_acc", "vcr": "q_ar_acc"}, "make demo"),
    "albef": DemoFamily("demo-albef-{}.yaml", {"retrieval": "t2i_r1", "ve": "acc", "nlvr2": "acc", "vqa": "score",
                                               "grounding": "acc"}, "make demo-albef", {"nlvr2": "ta"}),
}


def chance_level(val_folder: Optional[str]) -> Optional[float]:
    """What guessing scores on the held-out split: read from the demo task folder's manifest
    (`meta.chance`, written by data/tasks/demo.py), None when it does not say."""
    path = os.path.join(val_folder or "", "manifest.json")
    try:
        with open(path) as f:
            chance = json.load(f).get("meta", {}).get("chance")
    except (OSError, ValueError):
        return None
    return float(chance) if isinstance(chance, (int, float)) and not isinstance(chance, bool) else None


def run_one(config: str, overrides: list[str], run_dir: str, from_scratch: bool,
            start: Optional[str] = None) -> tuple[dict, Optional[str]]:
    """The run's held-out metrics (`val/` taken off their names) and its held-out task folder; `start`: the
    run to start from instead of the config's `finetune.init_from`."""
    from trainer.run import pretrain

    extra = [f"--train.run_dir={run_dir}"] + list(overrides)  # a finished run re-validates, no steps
    if start or from_scratch:
        extra.append(f"--finetune.init_from={start or 'null'}")
    cfg = load_config(config, extra)
    summary = pretrain(cfg)
    return {k[len("val/"):]: v for k, v in summary.items() if k.startswith("val/")}, cfg.finetune.val


def demo_finetune(config_dir: str, out: str, tasks: Optional[tuple[str, ...]] = None,
                  overrides: tuple[str, ...] = (), family: str = "uniter") -> list[dict]:
    """Both runs of each task of `family`; returns the table rows and writes <out>/table.{json,md}. One
    process group serves every run: DeepSpeed keeps the first group it sees, so a run may not take it down."""
    from trainer.distributed import setup_distributed, teardown

    demo = FAMILIES[family]
    unknown = sorted(set(tasks or ()) - set(demo.headline))
    if unknown:
        raise ValueError(f"--tasks: {', '.join(unknown)} is not among the {family} demo tasks "
                         f"({', '.join(demo.headline)})")
    setup_distributed()
    try:
        rows = _runs(demo, config_dir, out, tasks or tuple(demo.headline), overrides)
    finally:
        teardown()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(format_table(rows, demo.pretrained_by) + "\n")
    return rows


def _runs(demo: DemoFamily, config_dir: str, out: str, tasks: tuple[str, ...], overrides: tuple[str, ...]) -> list[dict]:
    rows = []
    for task in tasks:
        pre, val = _run_task(demo, config_dir, task, list(overrides), os.path.join(out, task), from_scratch=False)
        scratch, _ = _run_task(demo, config_dir, task, list(overrides), os.path.join(out, f"{task}-scratch"),
                               from_scratch=True)
        metric = f"{task}_{demo.headline[task]}"
        # A run that measures its own chance level reports it (ALBEF retrieval, grounding: `<metric>_chance`);
        # otherwise the task folder's manifest says it.
        chance = pre.get(f"{metric}_chance", chance_level(val) if val else None)
        rows.append({"task": task, "metric": demo.headline[task], "pretrained": pre.get(metric),
                     "scratch": scratch.get(metric), "chance": chance, "all_pretrained": pre, "all_scratch": scratch})
        print(format_table(rows, demo.pretrained_by), flush=True)
    return rows


def _run_task(demo: DemoFamily, config_dir: str, task: str, overrides: list[str], run_dir: str,
              from_scratch: bool) -> tuple[dict, Optional[str]]:
    """One column of a task's row: its preparing step first when the family names one (`<run_dir>-<step>`)."""
    config = os.path.join(config_dir, demo.config_name.format(task))
    step = demo.prepared_by.get(task)
    if step is None:
        return run_one(config, overrides, run_dir, from_scratch)
    prep_dir = f"{run_dir}-{step}"
    run_one(os.path.join(config_dir, demo.config_name.format(step)), overrides, prep_dir, from_scratch)
    return run_one(config, overrides, run_dir, from_scratch=False, start=prep_dir)


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(rows: list[dict], pretrained_by: str = "make demo") -> str:
    lines = [f"| task | metric | from `{pretrained_by}` | from scratch | chance |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {_cell(r['pretrained'])} | {_cell(r['scratch'])} | "
                     f"{_cell(r['chance'])} |")
    return "\n".join(lines)
