"""Typed cluster settings for `vlpt launch` (`--cluster configs/cluster/*.yaml`).

One frozen dataclass per target, as the run config (trainer/config.py): an unknown
key or a bad value stops `vlpt launch` with one line. Nothing secret belongs here:
credentials reach the job from the submitting environment (Slurm, DeepSpeed) or
from a Kubernetes Secret named here, never as values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from cluster.secrets import check_env
from trainer.config_files import ConfigError, load_yaml_with_includes
from trainer.config_loader import check_config_values, check_known_keys, from_dict

# Kubernetes resource quantity, the pattern of the CRD's schema ("8", "500m", "64Gi").
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
                      r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _one_word(where: str, value: Optional[str]) -> None:
    """#SBATCH lines and hostfiles are not shell: a value with blanks would be cut there."""
    if value is not None and (not value or re.search(r"\s", value)):
        raise ValueError(f"{where}: {value!r} must be one word without blanks")


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    """Time limit (e.g. 2-00:00:00); None = the partition's default."""
    cpus_per_task: int = 8
    """CPUs of a node's one task: its torchrun, the training processes and their data loaders."""
    mem: Optional[str] = None
    """Memory per node (e.g. 400G, or 0 for all of it); None = the partition's default."""
    signal_seconds: int = 300
    """USR1 this long before the time limit: the job requeues itself and resumes from the latest checkpoint."""
    extra_sbatch: tuple[str, ...] = ()
    """More #SBATCH options, one per entry (e.g. --constraint=a100)."""
    setup: tuple[str, ...] = ()
    """Shell lines run before srun (module load ..., source .venv/bin/activate)."""
    torchrun: Optional[str] = None
    """torchrun command on the nodes; None = the torchrun beside the Python that renders (shared filesystem)."""

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "mem", "torchrun"):
            _one_word(f"slurm.{name}", getattr(self, name))
        if self.time is not None and not SLURM_TIME.match(self.time):
            raise ValueError(f"slurm.time: {self.time!r} is not a Slurm time limit (e.g. 24:00:00 or 2-00:00:00)")
        if self.cpus_per_task < 1 or self.signal_seconds < 1:
            raise ValueError("slurm.cpus_per_task and slurm.signal_seconds must be >= 1")
        for opt in self.extra_sbatch:
            if not opt.startswith("--") or re.search(r"\s", opt):
                raise ValueError(f"slurm.extra_sbatch: {opt!r} must be one --option=value without blanks")
        if any("\n" in line for line in self.setup):
            raise ValueError("slurm.setup: give one shell line per entry")


@dataclass(frozen=True)
class K8sConfig:
    image: str = ""
    """Container image holding this repository with `vlpt` installed (required for k8s): the repository's
    Dockerfile builds it (`docker build -t <registry>/vlpt:<tag> .`, then `docker push`)."""
    namespace: str = "default"
    workdir: str = "/workspace/vlpt"
    """Working directory in the container; relative paths of the run config resolve against it."""
    runs_claim: str = ""
    """PersistentVolumeClaim (ReadWriteMany) for train.run_dir: a restarted pod resumes from its checkpoints."""
    runs_mount: str = "/workspace/vlpt/runs"
    """Where the claim is mounted; train.run_dir must lie inside it."""
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    """Size of /dev/shm (memory-backed emptyDir): DataLoader workers pass batches through it."""
    gpu_resource: str = "nvidia.com/gpu"
    secret_name: Optional[str] = None
    """Secret whose keys `secret_keys` become the container's environment (by reference); None = none
    (e.g. credentials from the node's instance role)."""
    secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    optional_secret_keys: tuple[str, ...] = ("AWS_SESSION_TOKEN",)
    """Taken from the Secret when it has them (temporary credentials)."""
    backoff_limit: int = 3
    """Pod restarts (each resumes from the latest checkpoint) before the job is marked failed."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: Optional[str] = None
    node_selector: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("cpu", "memory", "shm_size"):
            if not QUANTITY.match(getattr(self, name)):
                raise ValueError(f"k8s.{name}: {getattr(self, name)!r} is not a Kubernetes quantity (e.g. 8, 64Gi)")
        if not DNS_LABEL.match(self.namespace):
            raise ValueError(f"k8s.namespace: {self.namespace!r} is not a DNS label (lowercase, digits, '-')")
        for name in ("workdir", "runs_mount"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"k8s.{name} must be an absolute path in the container, got {getattr(self, name)!r}")
        if self.secret_name is not None and not DNS_LABEL.match(self.secret_name.replace(".", "-")):
            raise ValueError(f"k8s.secret_name: {self.secret_name!r} is not a Secret name")
        if self.backoff_limit < 0:
            raise ValueError("k8s.backoff_limit must be >= 0")


@dataclass(frozen=True)
class DeepSpeedLauncherConfig:
    hosts: tuple[str, ...] = ()
    """Hostnames for a multi-node hostfile (reached over ssh/pdsh); empty = this machine only."""

    def __post_init__(self) -> None:
        for host in self.hosts:
            _one_word("deepspeed.hosts", host)


@dataclass(frozen=True)
class ClusterConfig:
    job_name: Optional[str] = None
    """None = from train.run_dir's last component."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node requested from Slurm / Kubernetes, one process each; 0 = no GPUs (a CPU job with
    gloo, or GPUs the scheduler gives without asking) with `nproc_per_node` processes."""
    nproc_per_node: Optional[int] = None
    """Processes per node; None = gpus_per_node (1 for a CPU job)."""
    master_port: int = 29500
    """Rendezvous port on the first node."""
    max_restarts: int = 1
    """torchrun restarts of a node's processes after a failure (each resumes from the latest checkpoint)."""
    rdzv_timeout_s: int = 900
    """How long the nodes wait for each other at a (re)start before failing."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the job (NCCL_SOCKET_IFNAME, ...), written into the job's files: a credential
    (by its name or the look of its value) is refused here (cluster/secrets.py says where they go)."""
    shared_paths: tuple[str, ...] = ()
    """Path prefixes every node sees alike (/shared, /fsx, an NFS home): `vlpt launch` warns about each
    dataset, tokenizer or run-dir path outside them (k8s: also inside k8s.runs_mount); empty = unchecked."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    deepspeed: DeepSpeedLauncherConfig = field(default_factory=DeepSpeedLauncherConfig)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {self.nodes} and {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.gpus_per_node and self.nproc_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"one process per GPU: nproc_per_node={self.nproc_per_node} but gpus_per_node="
                             f"{self.gpus_per_node}; leave nproc_per_node out or set gpus_per_node: 0 for CPU")
        if not 0 < self.master_port < 65536 or self.max_restarts < 0 or self.rdzv_timeout_s < 1:
            raise ValueError("master_port must be a port, max_restarts >= 0 and rdzv_timeout_s >= 1")
        for name in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"env.{name}: not an environment variable name")
        check_env(self.env, "env")
        for prefix in self.shared_paths:
            if not prefix.startswith("/"):
                raise ValueError(f"shared_paths: {prefix!r} must be an absolute path prefix (e.g. /shared)")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def load_cluster_config(path: Optional[str], overrides: dict, target: Optional[str] = None) -> ClusterConfig:
    """The cluster YAML (or the defaults), then the CLI's --nodes / --gpus-per-node / ... values;
    `target` (slurm, k8s, ...) makes a refused credential's error say where that target's go."""
    raw = load_yaml_with_includes(path) if path else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    check_known_keys(ClusterConfig, raw)
    env = raw.get("env")
    if isinstance(env, dict):  # first here, for the target's message; ClusterConfig checks again
        try:
            check_env(env, "env", target)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_config_values(raw)
    return from_dict(ClusterConfig, raw)
