"""Whether a run may start in its run dir, by `train.resume` (auto | never | must).

A run is named by its run dir (`runs/<config stem>` by default), so the same command
resumes the same run; `never` and `must` turn a resume into an error when it would be a
surprise (docs/operations.md, "Run dirs and resuming").
"""
from __future__ import annotations

from typing import Optional

from trainer.checkpoint_files import checkpoint_root, list_complete
from trainer.config_files import ConfigError
from trainer.distributed import DistInfo, all_gather_objects


def agree_resume_mode(run_dir: str, mode: str, checkpoint_s3: Optional[str], info: DistInfo) -> None:
    """Collective. Rank 0 checks (`check_resume_mode`), every rank raises its one line alike: the
    run dir may be on a disk only rank 0 sees."""
    error = None
    if info.is_main:
        try:
            check_resume_mode(run_dir, mode, checkpoint_s3)
        except ConfigError as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        raise ConfigError(error)


def check_resume_mode(run_dir: str, mode: str, checkpoint_s3: Optional[str]) -> None:
    """Before the run dir is touched: `never` refuses a run dir holding a checkpoint; `must`
    refuses one without any, unless train.checkpoint_s3 may hold one (checked when fetched)."""
    tags = list_complete(checkpoint_root(run_dir))
    if mode == "never" and tags:
        raise ConfigError(f"train.run_dir={run_dir} already holds checkpoints ({tags[-1]}) and train.resume is "
                          "never; use a new name (--train.run_dir=runs/<new>) or --train.resume=auto to resume")
    if mode == "must" and not tags and not checkpoint_s3:
        raise ConfigError(nothing_to_resume(run_dir))


def nothing_to_resume(run_dir: str, checkpoint_s3: Optional[str] = None) -> str:
    where = f" nor in train.checkpoint_s3={checkpoint_s3}" if checkpoint_s3 else ""
    return (f"train.resume is must but train.run_dir={run_dir} holds no checkpoint{where}; check the run "
            "dir (--train.run_dir=...) or use --train.resume=auto to start a new run")


__all__ = ["agree_resume_mode", "check_resume_mode", "nothing_to_resume"]
