"""What `vlpt launch` checks before it writes a job: the run config at the job's world size, and
whether the paths the nodes read and write lie on storage they share.

A config that loads on a laptop can still fail on the cluster at the first start: the global
batch is split by the world size (nodes x processes per node), and ALBEF's queue must hold a
whole number of global batches. `Run.build` refuses those at start, after the job waited in
the queue for its nodes; here they are refused at render time, when nothing is written yet.
"""
from __future__ import annotations

import os
import posixpath
from typing import Iterator

from cluster.job import JobPlan
from trainer.config import Config
from trainer.config_files import ConfigError
from trainer.engine import batch_layout
from trainer.recipes import recipe_for
from trainer.recipes.base import Recipe


def check_run_config(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (one line) for what `Run.build` would refuse at `world_size` without reading
    data or touching a device: the batch split, the recipe's layout rules, `train.compile`'s blocks.
    The recipe's `check_config` already ran when the config was loaded."""
    layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, world_size)
    recipe = recipe_for(cfg)
    try:
        recipe.check_layout(cfg, layout)
    except ValueError as e:
        raise ConfigError(f"at the job's world size {world_size}: {e}") from None
    if cfg.train.compile and recipe.blocks_to_compile is Recipe.blocks_to_compile:
        raise ConfigError(f"train.compile: model.arch={recipe.arch!r} names no blocks to compile "
                          "(Recipe.blocks_to_compile); set train.compile=false")


def node_paths(plan: JobPlan) -> Iterator[tuple[str, str]]:
    """(config key, path) of what every node reads or writes: the datasets (a fine-tuning run's task and
    feature folders, its init_from), the tokenizer, the run dir."""
    cfg = plan.run_config
    for d in recipe_for(cfg).input_dirs(cfg):
        yield d.where, d.path
    if cfg.stage == "finetune" and cfg.finetune.init_from:
        yield "finetune.init_from", cfg.finetune.init_from
    yield "data.tokenizer.path", cfg.data.tokenizer.path
    yield "train.run_dir", cfg.train.run_dir


def unshared_path_warnings(plan: JobPlan) -> list[str]:
    """One line per path of `node_paths` that is local and under none of the cluster's `shared_paths`
    (s3:// and other URLs are fine); nothing when no shared_paths are declared or the job stays on
    this machine."""
    shared = plan.cluster.shared_paths
    one_host = plan.target == "local" or (plan.target == "deepspeed" and plan.cluster.nodes == 1)
    if not shared or one_host:
        return []
    prefixes = [*shared, plan.cluster.k8s.runs_mount] if plan.target == "k8s" else list(shared)
    lines = []
    for key, path in node_paths(plan):
        if "://" in path:
            continue
        where = posixpath.normpath(posixpath.join(plan.workdir, path))
        if any(_under(where, prefix) for prefix in prefixes):
            continue
        what = ("checkpoints written there are lost to the other nodes and to a requeued or restarted job"
                if key == "train.run_dir" else "the nodes may not see it")
        shown = path if where == path else f"{path} ({where})"
        lines.append(f"vlpt launch: warning: {key}={shown} is under none of the cluster's shared_paths "
                     f"({', '.join(prefixes)}): {what}")
    return lines


def _under(path: str, prefix: str) -> bool:
    prefix = os.path.normpath(prefix)
    return os.path.commonpath([path, prefix]) == prefix
