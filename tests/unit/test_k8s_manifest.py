"""`vlpt launch k8s`: the PyTorchJob validates against the training operator's CRD schema."""
import copy
import json

import pytest
import yaml

from cluster.config import load_cluster_config
from cluster.job import plan_job
from cluster.launch import render_job
from tests.conftest import REPO
from trainer.config import load_config
from trainer.config_files import ConfigError

jsonschema = pytest.importorskip("jsonschema")

CFG = "configs/pretrain/demo.yaml"
SCHEMA = json.loads((REPO / "tests/fixtures/pytorchjob_crd_schema.json").read_text())
K8S = {"image": "registry.example.com/vlpt:1", "namespace": "ml", "runs_claim": "vlpt-runs",
       "secret_name": "vlpt-s3", "shm_size": "32Gi", "cpu": "16", "memory": "200Gi"}


def strict(schema):
    """Unknown fields are errors, as under kubectl's default --validate=strict (the API server
    reports them); also keeps the fixture's left-out subtrees from passing anything unchecked."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


VALIDATOR = jsonschema.Draft7Validator(strict(SCHEMA))


def errors(job: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(job)]


def render(nodes=2, gpus=8, **k8s):
    cluster = load_cluster_config(None, {"nodes": nodes, "gpus_per_node": gpus, "max_restarts": 2,
                                         "k8s": {**K8S, **k8s}})
    plan = plan_job("k8s", CFG, ["--train.run_dir=runs/uniter-{now}"], cluster, now="20250101-120000")
    config_map, job = yaml.safe_load_all(render_job(plan).files["pytorchjob.yaml"])
    return plan, config_map, job


@pytest.mark.parametrize("nodes,gpus", [(1, 0), (1, 8), (4, 8)])
def test_manifest_validates_against_the_crd_schema(nodes, gpus):
    plan, _, job = render(nodes, gpus)
    assert errors(job) == []
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(max(gpus, 1))


def test_pod_resources_shm_runs_volume_and_command():
    plan, _, job = render(nodes=2, gpus=8)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == K8S["image"] and spec["restartPolicy"] == "OnFailure"
        assert container["resources"]["limits"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": 8}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
        assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "vlpt-runs"}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm" and plan.run_dir.startswith(mounts["runs"] + "/")
        cmd = container["command"]
        assert cmd[:4] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--max-restarts=2"]
        assert cmd[-2:] == ["--config", "/etc/vlpt/config.yaml"] and mounts["config"] == "/etc/vlpt"
    assert plan.run_dir == "/workspace/vlpt/runs/uniter-20250101-120000"


def test_credentials_only_as_secret_references():
    _, _, job = render()
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert "value" not in by_name[key]
        assert by_name[key]["valueFrom"]["secretKeyRef"]["name"] == "vlpt-s3"
    assert by_name["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    _, _, job = render(secret_name=None)
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert not any(e["name"].startswith("AWS_") for e in env)


def test_config_map_holds_the_frozen_config(tmp_path):
    plan, config_map, job = render()
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    assert load_config(str(path)) == plan.run_config and plan.run_config.train.resume == "auto"
    assert config_map["metadata"]["name"] == job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "volumes"][2]["configMap"]["name"]


def _master(job):
    return job["spec"]["pytorchReplicaSpecs"]["Master"]


BREAKAGES = {
    "replicas as text": lambda j: _master(j).__setitem__("replicas", "two"),
    "GPU limit not a quantity": lambda j: _master(j)["template"]["spec"]["containers"][0]["resources"][
        "limits"].__setitem__("nvidia.com/gpu", "lots"),
    "env entry without a name": lambda j: _master(j)["template"]["spec"]["containers"][0]["env"].append(
        {"value": "1"}),
    "secretKeyRef without key": lambda j: _master(j)["template"]["spec"]["containers"][0]["env"][-1][
        "valueFrom"]["secretKeyRef"].pop("key"),
    "misspelled field": lambda j: _master(j)["template"]["spec"]["containers"][0].__setitem__(
        "resource", {}),
    "no replica specs": lambda j: j["spec"].pop("pytorchReplicaSpecs"),
    "container without name": lambda j: _master(j)["template"]["spec"]["containers"][0].pop("name"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_manifests_fail_validation(breakage):
    _, _, job = render()
    broken = copy.deepcopy(job)
    BREAKAGES[breakage](broken)
    assert errors(broken), breakage


def test_without_a_claim_checkpoints_go_to_s3():
    cluster = load_cluster_config(None, {"k8s": {**K8S, "runs_claim": ""}})
    plan = plan_job("k8s", CFG, ["--train.checkpoint_s3=s3://bucket/ckpt"], cluster)
    _, job = yaml.safe_load_all(render_job(plan).files["pytorchjob.yaml"])
    assert errors(job) == []
    volumes = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]}
    assert volumes["runs"] == {"name": "runs", "emptyDir": {}}


@pytest.mark.parametrize("k8s,args,needle", [
    ({"image": ""}, [], "k8s.image"),
    ({"runs_claim": ""}, [], "runs_claim .* or train.checkpoint_s3"),
    ({}, ["--train.run_dir=/tmp/x"], "not inside the runs volume"),
    ({"shm_size": "lots"}, [], "k8s.shm_size"),
    ({"namespace": "My_NS"}, [], "k8s.namespace"),
])
def test_bad_k8s_settings(k8s, args, needle):
    with pytest.raises(ConfigError, match=needle):
        cluster = load_cluster_config(None, {"k8s": {**K8S, **k8s}})
        render_job(plan_job("k8s", CFG, args, cluster))
