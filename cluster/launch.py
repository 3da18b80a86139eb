"""`vlpt launch {local,deepspeed,slurm,k8s}`: render a job, write it, print it, submit it.

The files of a job (into `<run_dir>/launch/`, for k8s `runs/k8s/<job>/`):
    config.yaml       the frozen run config the job reads (fixed run_dir, resume true)
    job.sbatch        slurm: the batch script            -> `sbatch job.sbatch`
    pytorchjob.yaml   k8s: ConfigMap + PyTorchJob        -> `kubectl apply -f pytorchjob.yaml`
    launch.sh         local / deepspeed: the command     -> `bash launch.sh`
    hostfile          deepspeed over several hosts
`--dry-run` prints them and writes nothing; `--submit` writes and runs the last column.
Before anything is rendered the run config is checked at the job's world size (cluster/checks.py):
a refused job writes nothing.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from cluster.checks import check_run_config, unshared_path_warnings
from cluster.config import load_cluster_config
from cluster.job import JobPlan, plan_job
from cluster.k8s import render_k8s
from cluster.local import hostfile_text, render_local
from cluster.slurm import render_slurm
from trainer.config_files import ConfigError

Mode = Literal["render", "dry-run", "submit"]


@dataclass(frozen=True)
class RenderedJob:
    plan: JobPlan
    files: dict[str, str]
    """File name in plan.out_dir -> text."""
    submit: list[str]
    """argv that submits (slurm, k8s) or runs (local, deepspeed) the job."""


def render_job(plan: JobPlan) -> RenderedJob:
    """The job's files; ConfigError when its run config would be refused at its world size."""
    def path(name: str) -> str:
        return os.path.join(plan.out_dir, name)

    check_run_config(plan.run_config, plan.cluster.nodes * plan.cluster.procs_per_node)
    files = {"config.yaml": plan.config_yaml}
    if plan.target == "slurm":
        files["job.sbatch"] = render_slurm(plan)
        return RenderedJob(plan, files, ["sbatch", path("job.sbatch")])
    if plan.target == "k8s":
        files["pytorchjob.yaml"] = render_k8s(plan)
        return RenderedJob(plan, files, ["kubectl", "apply", "-f", path("pytorchjob.yaml")])
    hosts = plan.cluster.deepspeed.hosts if plan.target == "deepspeed" else ()
    if hosts:
        files["hostfile"] = hostfile_text(hosts[:plan.cluster.nodes], plan.cluster.procs_per_node)
    files["launch.sh"] = render_local(plan, path("hostfile") if hosts else None)
    return RenderedJob(plan, files, ["bash", path("launch.sh")])


def write_job(job: RenderedJob) -> None:
    """Write the files; re-rendering a run with a different config into the same place is refused."""
    plan = job.plan
    frozen = os.path.join(plan.out_dir, "config.yaml")
    if os.path.isfile(frozen) and open(frozen).read() != job.files["config.yaml"]:
        raise ConfigError(f"{frozen} holds a different config of the run {plan.run_dir}; give a new "
                          f"train.run_dir (or remove {plan.out_dir}) to render another job")
    os.makedirs(plan.out_dir, exist_ok=True)
    for name, text in job.files.items():
        with open(os.path.join(plan.out_dir, name), "w") as f:
            f.write(text)
    if plan.target != "k8s":  # Slurm opens --output there before the script runs
        os.makedirs(os.path.join(plan.run_dir, "logs"), exist_ok=True)


def launch(target: str, config: str, overrides: list[str], mode: Mode = "render", cluster: Optional[str] = None,
           out: Optional[str] = None, now: Optional[str] = None, **cluster_values) -> int:
    """`cluster_values` (nodes, gpus_per_node, nproc_per_node, master_port) override the --cluster YAML."""
    plan = plan_job(target, config, overrides, load_cluster_config(cluster, cluster_values, target), out, now)
    job = render_job(plan)
    for line in unshared_path_warnings(plan):
        print(line, file=sys.stderr, flush=True)
    if mode == "dry-run":
        for name, text in job.files.items():
            print(f"# ---- {os.path.join(plan.out_dir, name)}\n{text}", end="" if text.endswith("\n") else "\n")
        print(f"# ---- not written (--dry-run); to submit: {shlex.join(job.submit)}", flush=True)
        return 0
    write_job(job)
    print(f"{plan.target} job {plan.name}: {', '.join(job.files)} in {plan.out_dir}; run dir {plan.run_dir}")
    print(shlex.join(job.submit), flush=True)
    if mode == "render":
        return 0
    return subprocess.run(job.submit, cwd=plan.workdir if target != "k8s" else None).returncode
