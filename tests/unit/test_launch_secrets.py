"""A planted secret appears in no file `vlpt launch` writes and no line it prints, for every target;
credentials offered as config values are refused. (The MLflow side: tests/integration/test_launch_secrets.py.)"""
import pytest

from cluster.config import load_cluster_config
from tests.conftest import REPO
from vlpt.cli import main

CFG = "configs/pretrain/demo.yaml"
SECRET = "PLANTED-7f3a9c-SECRET"
PLANTED_ENV = {"AWS_ACCESS_KEY_ID": "AKIA" + SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_SESSION_TOKEN": "tok-" + SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET}


@pytest.fixture
def cluster_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes: 2\ngpus_per_node: 4\nenv: {NCCL_DEBUG: WARN}\n"
                    "deepspeed: {hosts: [n1, n2]}\n"
                    "k8s: {image: img:1, runs_claim: runs, secret_name: vlpt-s3,\n"
                    "      secret_keys: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD]}\n")
    return path


@pytest.mark.parametrize("target", ["local", "deepspeed", "slurm", "k8s"])
def test_planted_secret_in_no_rendered_file_or_printed_line(target, tmp_path, cluster_yaml, monkeypatch, capfd):
    for name, value in PLANTED_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # relative run dirs land here
    nodes = ["--nodes", "1"] if target == "local" else []
    base = ["launch", target, "--config", str(REPO / CFG),
            "--cluster", str(cluster_yaml), *nodes, "--out", str(tmp_path / "out")]
    assert main([*base, "--dry-run"]) == 0
    assert main(base) == 0  # render: writes the files
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != cluster_yaml]
    assert {p.name for p in files} >= {"config.yaml"} and len(files) >= 2
    for path in files:
        assert SECRET not in path.read_text(), path
    if target == "k8s":  # the Secret is referenced by name, the keys listed, the values nowhere
        manifest = (tmp_path / "out" / "pytorchjob.yaml").read_text()
        assert "secretKeyRef" in manifest and "MLFLOW_TRACKING_PASSWORD" in manifest


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"])
def test_credentials_in_cluster_env_are_refused(name):
    with pytest.raises(ValueError, match="credentials are never written into a job"):
        load_cluster_config(None, {"env": {name: SECRET}})


def test_url_with_password_is_refused(capsys):
    uri = f"--tracking.uri=http://user:{SECRET}@mlflow:5000"
    assert main(["launch", "slurm", "--config", CFG, "--dry-run", uri]) == 2
    out = capsys.readouterr()
    assert "tracking.uri carries a password" in out.err and SECRET not in out.out + out.err
