"""What a rendered job runs: the frozen run config and the job's geometry.

A requeued Slurm job, a restarted pod or a torchrun restart must continue the
same run, so the run config is resolved once, here: `{now}` in train.run_dir is
filled at render time, the directory made absolute where the job runs, and
train.resume set; the job then reads that file with no overrides.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import time
from dataclasses import dataclass

from cluster.config import ClusterConfig
from trainer.config import Config, config_to_yaml, load_config
from trainer.config_files import ConfigError

TARGETS = ("local", "deepspeed", "slurm", "k8s")
K8S_CONFIG_DIR = "/etc/vlpt"  # the ConfigMap holding the frozen config is mounted here


@dataclass(frozen=True)
class JobPlan:
    target: str
    name: str
    """Job name; a DNS label (Kubernetes objects take it)."""
    cluster: ClusterConfig
    run_config: Config
    """Frozen: fixed train.run_dir (absolute where the job runs), train.resume true."""
    out_dir: str
    """Where the rendered files go on this machine (`<run_dir>/launch`; k8s: `runs/k8s/<job>`)."""
    config_path: str
    """Where the job reads the frozen config."""
    workdir: str
    """Working directory of the job's processes."""

    @property
    def run_dir(self) -> str:
        return self.run_config.train.run_dir

    @property
    def config_yaml(self) -> str:
        return config_to_yaml(self.run_config)

    @property
    def command(self) -> str:
        """The `vlpt` command that runs the config: its stage's name (`pretrain`, `finetune`)."""
        return self.run_config.stage


def plan_job(target: str, config: str, overrides: list[str], cluster: ClusterConfig,
             out_dir: str | None = None, now: str | None = None) -> JobPlan:
    """Load and freeze the run config for `target`; `now` fills `{now}` (default: the current time)."""
    if target not in TARGETS:
        raise ConfigError(f"unknown launch target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "local" and cluster.nodes != 1:
        raise ConfigError("local runs on this machine only: use --nodes 1, or slurm / k8s / deepspeed with hosts")
    cfg = load_config(config, overrides)  # refuses URLs with a password
    run_dir = cfg.train.run_dir.replace("{now}", now or time.strftime("%Y%m%d-%H%M%S"))
    name = job_name(cluster.job_name or os.path.basename(run_dir.rstrip("/")))
    if target == "k8s":
        workdir = cluster.k8s.workdir
        run_dir = k8s_run_dir(run_dir, cluster.k8s.workdir, cluster.k8s.runs_mount)
        out_dir = os.path.abspath(out_dir or os.path.join("runs", "k8s", name))
        config_path = posixpath.join(K8S_CONFIG_DIR, "config.yaml")
    else:
        workdir = os.getcwd()
        run_dir = os.path.abspath(run_dir)
        out_dir = os.path.abspath(out_dir or os.path.join(run_dir, "launch"))
        config_path = os.path.join(out_dir, "config.yaml")
    frozen = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=run_dir, resume=True))
    return JobPlan(target=target, name=name, cluster=cluster, run_config=frozen, out_dir=out_dir,
                   config_path=config_path, workdir=workdir)


def k8s_run_dir(run_dir: str, workdir: str, runs_mount: str) -> str:
    """train.run_dir as a path in the pod; it must be on the runs volume, or a restarted pod starts over."""
    path = posixpath.normpath(posixpath.join(workdir, run_dir))
    mount = posixpath.normpath(runs_mount)
    if posixpath.commonpath([path, mount]) != mount or path == mount:
        raise ConfigError(f"train.run_dir={run_dir} is {path} in the pod, not inside the runs volume "
                          f"(k8s.runs_mount={mount}): checkpoints would be lost with the pod; "
                          f"set --train.run_dir={mount}/<name>")
    return path


def job_name(text: str) -> str:
    """A DNS label of at most 40 characters (the training operator appends -worker-N to pod names)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].rstrip("-")
    return name or "vlpt"

