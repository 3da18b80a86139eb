"""A Kubeflow PyTorchJob (plus the ConfigMap holding the frozen run config) for a job.

Templates are filled with JSON values (JSON is YAML), parsed, assembled and dumped
again, so quoting never depends on what a value contains.
"""
from __future__ import annotations

import json
import posixpath

import yaml

from cluster.job import K8S_CONFIG_DIR, JobPlan
from cluster.templating import fill
from trainer.config_files import ConfigError


def render_k8s(plan: JobPlan) -> str:
    """Two YAML documents: the ConfigMap, then the PyTorchJob."""
    k = plan.cluster.k8s
    if not k.image:
        raise ConfigError("k8s needs k8s.image in the --cluster YAML: build it from the repository's Dockerfile "
                          "(docker build -t <registry>/vlpt:<tag> . && docker push <registry>/vlpt:<tag>)")
    if not k.runs_claim and not plan.run_config.train.checkpoint_s3:
        raise ConfigError("k8s needs k8s.runs_claim (a ReadWriteMany PersistentVolumeClaim for train.run_dir) "
                          "or train.checkpoint_s3, or a restarted pod could not resume")
    config_map, job = yaml.safe_load_all(fill(
        "pytorchjob.yaml", name=_j(plan.name), vlpt_command=plan.command, namespace=_j(k.namespace),
        config_map=_j(f"{plan.name}-config"),
        config_yaml=_j(plan.config_yaml), nodes=plan.cluster.nodes, nproc=_j(str(plan.cluster.procs_per_node)),
        backoff_limit=k.backoff_limit))
    specs = {"Master": replica_spec(plan, 1)}
    if plan.cluster.nodes > 1:
        specs["Worker"] = replica_spec(plan, plan.cluster.nodes - 1)
    job["spec"]["pytorchReplicaSpecs"] = specs
    return yaml.dump_all([config_map, job], Dumper=_BlockDumper, sort_keys=False)


def replica_spec(plan: JobPlan, replicas: int) -> dict:
    k = plan.cluster.k8s
    spec = yaml.safe_load(fill(
        "pytorchjob-replica.yaml", replicas=replicas, name=_j(plan.name), image=_j(k.image),
        image_pull_policy=_j(k.image_pull_policy), workdir=_j(k.workdir), command=_j(command(plan)),
        env=_j(container_env(plan)), master_port=plan.cluster.master_port, resources=_j(resources(plan)),
        runs_mount=_j(k.runs_mount), config_dir=_j(K8S_CONFIG_DIR), shm_size=_j(k.shm_size),
        runs_volume=_j(runs_volume(plan)), config_map=_j(f"{plan.name}-config")))
    pod = spec["template"]["spec"]
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    return spec


def runs_volume(plan: JobPlan) -> dict:
    """The claim keeps checkpoints across pod restarts; without one, the pod's scratch space will do
    when every checkpoint is uploaded (train.checkpoint_s3) and a restarted pod resumes from there."""
    if plan.cluster.k8s.runs_claim:
        return {"name": "runs", "persistentVolumeClaim": {"claimName": plan.cluster.k8s.runs_claim}}
    return {"name": "runs", "emptyDir": {}}


def command(plan: JobPlan) -> list[str]:
    """torchrun per pod; node rank and master address come from the operator's PET_* environment."""
    c = plan.cluster
    return ["torchrun", f"--nnodes={c.nodes}", f"--nproc-per-node={c.procs_per_node}",
            f"--max-restarts={c.max_restarts}",
            # $(POD_NAME) is expanded by Kubernetes: one log directory per pod, one subfolder per rank.
            f"--log-dir={posixpath.join(plan.run_dir, 'logs')}/$(POD_NAME)", "--redirects=3", "--tee=3",
            "-m", "vlpt", plan.command, "--config", plan.config_path]


def container_env(plan: JobPlan) -> list[dict]:
    """Plain settings as values; credentials only as secretKeyRef (name and key, never the value)."""
    k = plan.cluster.k8s
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
           {"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": n, "value": v} for n, v in plan.cluster.env.items()]
    if k.secret_name:
        env += [_secret_ref(k.secret_name, key, optional=False) for key in k.secret_keys]
        env += [_secret_ref(k.secret_name, key, optional=True) for key in k.optional_secret_keys]
    return env


def _secret_ref(secret: str, key: str, optional: bool) -> dict:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def resources(plan: JobPlan) -> dict:
    k, gpus = plan.cluster.k8s, plan.cluster.gpus_per_node
    limits = {"cpu": k.cpu, "memory": k.memory, **({k.gpu_resource: gpus} if gpus else {})}
    return {"requests": {"cpu": k.cpu, "memory": k.memory}, "limits": limits}


def _j(value) -> str:
    return json.dumps(value)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the frozen config in the ConfigMap) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
