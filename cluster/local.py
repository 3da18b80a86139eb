"""Commands of the launchers that start processes from this machine: torchrun, DeepSpeed."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from cluster.job import JobPlan
from cluster.secrets import check_deepspeed_env_files, pdsh_filter
from cluster.slurm import env_exports
from cluster.templating import fill
from trainer.config_files import ConfigError

LAUNCHERS = ("local", "deepspeed")
# A GPU job forgets the DS_ACCELERATOR of the shell that runs it (cpu, for CPU runs on this machine),
# which would keep DeepSpeed on the CPU; a CPU job (gpus_per_node: 0) keeps it.
GPU_JOB_UNSET = ("# DeepSpeed finds the GPUs itself; the DS_ACCELERATOR of a CPU session (cpu) would keep them idle\n"
                 "unset DS_ACCELERATOR")


def render_command(launcher: str, config: str, nproc: int, overrides: Sequence[str] = (),
                   master_port: int = 29500, *, max_restarts: int = 0, log_dir: Optional[str] = None,
                   hostfile: Optional[str] = None, nodes: int = 1, master_addr: Optional[str] = None,
                   command: str = "pretrain") -> list[str]:
    """argv of `vlpt <command> --config <config> <overrides>` (`pretrain` or `finetune`) under torchrun
    (`local`) or `deepspeed`.

    `log_dir` adds per-rank log files; `hostfile` (DeepSpeed only) spreads the run over `nodes` hosts.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"render_command starts {' or '.join(LAUNCHERS)}, not {launcher!r}")
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    bin_dir = Path(sys.executable).parent
    program = [command, "--config", config, *overrides]
    if launcher == "local":
        restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
        logs = [f"--log-dir={log_dir}", "--redirects=3", "--tee=3"] if log_dir else []
        return [str(bin_dir / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={master_port}",
                *restarts, *logs, "-m", "vlpt", *program]
    hosts = ["--hostfile", hostfile, "--num_nodes", str(nodes), "--master_addr", master_addr] if hostfile else []
    logs = ["--enable_each_rank_log", log_dir] if log_dir else []
    return [str(bin_dir / "deepspeed"), *hosts, "--num_gpus", str(nproc), "--master_port", str(master_port),
            *logs, "--module", "vlpt", *program]


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed's MPI-style hostfile: `host slots=G` per line."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def render_local(plan: JobPlan, hostfile: Optional[str]) -> str:
    """The launch script of a local/deepspeed job; `hostfile` is its path when the job spans hosts."""
    c = plan.cluster
    if plan.target == "deepspeed" and c.nodes > 1 and len(c.deepspeed.hosts) < c.nodes:
        raise ConfigError(f"--nodes {c.nodes} needs at least {c.nodes} deepspeed.hosts in the --cluster YAML, "
                          f"got {len(c.deepspeed.hosts)}")
    argv = render_command(plan.target, plan.config_path, c.procs_per_node, master_port=c.master_port,
                          max_restarts=c.max_restarts, log_dir=os.path.join(plan.run_dir, "logs", plan.target),
                          hostfile=hostfile, nodes=c.nodes, master_addr=c.deepspeed.hosts[0] if hostfile else None,
                          command=plan.command)
    over_pdsh = hostfile is not None and c.nodes > 1  # one host: DeepSpeed starts it here, no pdsh
    if over_pdsh:
        try:
            check_deepspeed_env_files(plan.workdir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return fill("local.sh", name=plan.name, vlpt_command=plan.command, nodes=c.nodes, nproc=c.procs_per_node,
                target=plan.target,
                config_path=plan.config_path, workdir=shlex.quote(plan.workdir), env=env_exports(c.env),
                accelerator=GPU_JOB_UNSET if c.gpus_per_node else "",
                pdsh_filter=pdsh_filter() if over_pdsh else "", command=shlex.join(argv))
