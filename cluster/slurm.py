"""The sbatch script of a job: one task per node, srun + torchrun with c10d rendezvous."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from cluster.job import JobPlan
from cluster.templating import fill
from trainer.config_files import ConfigError

# Paths go into #SBATCH lines (not shell-parsed) and unquoted shell words: keep them plain.
PLAIN_PATH = re.compile(r"^[\w./+@=:,-]+$")

HOST_LOCAL_ENV = ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Settings of the machine that runs `sbatch`, unset in the job before slurm.setup and the cluster's env:
DS_ACCELERATOR=cpu (a CPU laptop or login node) would run the GPU nodes on their CPUs (DeepSpeed finds
each node's accelerator itself, CPU where there is no GPU); CUDA_VISIBLE_DEVICES names the submitting
machine's GPUs (Slurm sets the nodes' own); OMP/MKL thread counts are sized for its cores (torchrun
gives each rank 1 thread unless the job sets more). PATH, VIRTUAL_ENV, PYTHONPATH and LD_LIBRARY_PATH
stay: on a shared filesystem they name what the nodes run, as `slurm.torchrun`'s default assumes."""


def render_slurm(plan: JobPlan) -> str:
    """The script text; `plan.run_dir/logs` must exist before `sbatch` (Slurm opens --output there)."""
    c, s = plan.cluster, plan.cluster.slurm
    torchrun = s.torchrun or str(Path(sys.executable).parent / "torchrun")
    log_root = f"{plan.run_dir}/logs"
    for what, path in (("train.run_dir", plan.run_dir), ("working directory", plan.workdir),
                       ("config path", plan.config_path), ("slurm.torchrun", torchrun)):
        if not PLAIN_PATH.match(path):
            raise ConfigError(f"{what} {path!r}: a Slurm job needs a path of letters, digits and ./_+-@=:, only")
    return fill("slurm.sbatch", name=plan.name, vlpt_command=plan.command, nodes=c.nodes, nproc=c.procs_per_node,
                cpus_per_task=s.cpus_per_task, sbatch_options=sbatch_options(plan),
                signal_seconds=s.signal_seconds, log_root=log_root, workdir=plan.workdir,
                host_local_env=" ".join(HOST_LOCAL_ENV),
                setup="\n".join(s.setup), env=env_exports(c.env),
                timeout_minutes=plan.run_config.parallel.timeout_minutes, torchrun=torchrun,
                master_port=c.master_port, rdzv_timeout_s=c.rdzv_timeout_s, max_restarts=c.max_restarts,
                config_path=plan.config_path)


def sbatch_options(plan: JobPlan) -> str:
    """#SBATCH lines of the settings that are given (GPUs only for a GPU job)."""
    s = plan.cluster.slurm
    opts = [f"--gpus-per-node={plan.cluster.gpus_per_node}"] if plan.cluster.gpus_per_node else []
    opts += [f"--{name}={value}" for name, value in (("partition", s.partition), ("account", s.account),
                                                      ("qos", s.qos), ("time", s.time), ("mem", s.mem))
             if value is not None]
    return "\n".join(f"#SBATCH {opt}" for opt in [*opts, *s.extra_sbatch])


def env_exports(env: dict[str, str]) -> str:
    """`export NAME='value'` lines (names were checked by ClusterConfig)."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())
