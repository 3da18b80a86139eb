"""Credentials never reach a file or a printed line: refused where a config offers them as values
(cluster `env:` values, URLs with a user name), taken but never written where they belong (the
environment of the process), and never put on pdsh's command line by a multi-node DeepSpeed job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_bucket, run_vlpt, s3_test_client, subprocess_env, write_tiny_config
from vlpt.cli import main

DEMO = str(REPO / "configs/pretrain/demo.yaml")
K8S = {"image": "img:1", "runs_claim": "runs", "secret_name": "vlpt-creds"}

# Credentials offered as cluster `env:` values: refused, whatever the target.
ENV_CREDENTIALS = {
    "WANDB_API_KEY": "FAKE-SECRET-1a2b-wandb",
    "AZURE_STORAGE_KEY": "FAKE-SECRET-1a2b-azkey",
    "AZURE_CLIENT_SECRET": "FAKE-SECRET-1a2b-azclient",
    "HF_TOKEN": "FAKE-SECRET-1a2b-hf",
    "HUGGING_FACE_HUB_TOKEN": "FAKE-SECRET-1a2b-hfhub",
    "AWS_SECRET_ACCESS_KEY": "FAKE-SECRET-1a2b-aws",
    "MLFLOW_TRACKING_TOKEN": "FAKE-SECRET-1a2b-mltoken",
    # Innocent names, credentials in the value:
    "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=FAKE-SECRET-1a2b-conn",
    "MLFLOW_TRACKING_URI": "https://user:FAKE-SECRET-1a2b-mlpass@mlflow.example.com",
    "DATA_MIRROR": "https://FAKE-SECRET-1a2b-userinfo@mirror.example.com/shards",
    "DB_URL": "Server=db;Database=x;User Id=u;Password=FAKE-SECRET-1a2b-dbpass;",
    "SAS_URL": "https://a.blob.core.windows.net/c?sv=2022-11-02&sig=FAKE-SECRET-1a2b-sas",
    "GIT_AUTH": "ghp_FAKESECRET1a2bGithubToken0123456789",
    "PRIVATE_KEY_PEM": "-----BEGIN PRIVATE KEY-----FAKE-SECRET-1a2b-pem",
}
# Where each target's credentials belong, as the refusal must say.
MECHANISM = {"slurm": "sbatch", "k8s": "k8s.secret_name", "deepspeed": ".deepspeed_env", "local": "launch.sh"}

# URLs with a user name (a token) or a password, in the run config: refused.
URL_USERINFO = {
    "tracking.uri": "https://ghp_FAKESECRET9c8dTrackingToken01234@mlflow.example.com",
    "storage.s3.endpoint_url": "http://FAKE-SECRET-9c8d-endpoint@127.0.0.1:9000",
    "train.checkpoint_s3": "s3://AKIAFAKESECRET9C8D:FAKE-SECRET-9c8d-ckpt@bucket/prefix",
    "data.train": "https://FAKE-SECRET-9c8d-shards@data.example.com/train",
}

# Credentials in the environment of `vlpt launch` / `vlpt pretrain`: used (boto3 signs with
# them), never written.
PROCESS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKESECRET5E6F",
    "AWS_SECRET_ACCESS_KEY": "FAKE-SECRET-5e6f-aws",
    "MLFLOW_TRACKING_PASSWORD": "FAKE-SECRET-5e6f-mlpass",
    "MLFLOW_TRACKING_TOKEN": "FAKE-SECRET-5e6f-mltoken",
    "MLFLOW_TRACKING_URI": "https://user:FAKE-SECRET-5e6f-mluri@mlflow.example.com",
    "WANDB_API_KEY": "FAKE-SECRET-5e6f-wandb",
    "HF_TOKEN": "FAKE-SECRET-5e6f-hf",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=FAKE-SECRET-5e6f-conn",
    "PYTHON_FAKE_PASSWORD": "FAKE-SECRET-5e6f-python",  # DeepSpeed forwards every PYTHON* variable
}
ALL_SECRETS = ([v for v in ENV_CREDENTIALS.values()] + list(URL_USERINFO.values()) + list(PROCESS_ENV.values()))
SECRET_MARKERS = ["FAKE-SECRET", "FAKESECRET"]


def cluster_yaml(path: Path, env: dict, **sections) -> Path:
    path.write_text(yaml.safe_dump({"nodes": 2, "gpus_per_node": 0, "nproc_per_node": 1, "env": env,
                                    "deepspeed": {"hosts": ["n1", "n2"]}, "k8s": K8S, **sections}))
    return path


def vlpt(args: list[str], env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlpt", *args], cwd=cwd,
                          env={**subprocess_env(), **(env or {})}, capture_output=True, text=True, timeout=120)


def assert_refused(proc_or_rc, err: str, *needles: str) -> None:
    assert proc_or_rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlpt: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not any(m in err for m in SECRET_MARKERS), err


# ---------------------------------------------------------------- refused as config values

@pytest.mark.parametrize("target", ["slurm", "k8s", "deepspeed", "local"])
@pytest.mark.parametrize("name", sorted(ENV_CREDENTIALS))
def test_credential_in_cluster_env_is_refused(target, name, tmp_path, capsys):
    cluster = cluster_yaml(tmp_path / "cluster.yaml", {"NCCL_DEBUG": "WARN", name: ENV_CREDENTIALS[name]})
    nodes = ["--nodes", "1"] if target == "local" else []
    rc = main(["launch", target, "--config", DEMO, "--cluster", str(cluster), *nodes,
               "--out", str(tmp_path / "out"), f"--train.run_dir={tmp_path}/run"])
    assert_refused(rc, capsys.readouterr().err, f"env.{name}", MECHANISM[target])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml"]


@pytest.mark.parametrize("value", ["/etc/gcp/key.json", "~/.config/gcloud/application_default_credentials.json"])
def test_path_to_a_credential_file_is_not_a_credential(value, tmp_path, capsys):
    """GOOGLE_APPLICATION_CREDENTIALS (and *_FILE names) hold where a key file is, not the key."""
    cluster = cluster_yaml(tmp_path / "cluster.yaml", {"GOOGLE_APPLICATION_CREDENTIALS": value,
                                                        "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/credentials"})
    assert main(["launch", "slurm", "--config", DEMO, "--cluster", str(cluster), "--out", str(tmp_path / "out"),
                 f"--train.run_dir={tmp_path}/run"]) == 0
    sbatch = (tmp_path / "out/job.sbatch").read_text()
    assert "export GOOGLE_APPLICATION_CREDENTIALS=" in sbatch and value in sbatch
    capsys.readouterr()
    key_json = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----FAKE-SECRET-77"}'
    cluster_yaml(tmp_path / "cluster.yaml", {"GOOGLE_APPLICATION_CREDENTIALS": key_json})
    rc = main(["launch", "slurm", "--config", DEMO, "--cluster", str(cluster), "--out", str(tmp_path / "out2"),
               f"--train.run_dir={tmp_path}/run2"])
    assert_refused(rc, capsys.readouterr().err, "env.GOOGLE_APPLICATION_CREDENTIALS")


@pytest.mark.parametrize("key", sorted(URL_USERINFO))
def test_url_with_userinfo_is_refused_everywhere(key, tmp_path):
    cfg = tmp_path / "c.yaml"
    section, *rest = key.split(".")
    node: dict = {}
    raw = {"include": DEMO, section: node}
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = URL_USERINFO[key]
    cfg.write_text(yaml.safe_dump(raw))
    for args in (["config", "--config", str(cfg)],                               # in the file
                 ["config", "--config", DEMO, f"--{key}={URL_USERINFO[key]}"]):  # as an override
        proc = vlpt(args)
        assert_refused(proc.returncode, proc.stderr, key, "user@")
        assert not any(m in proc.stdout for m in SECRET_MARKERS)


def test_url_userinfo_in_the_cluster_yaml_is_refused(tmp_path, capsys):
    cluster = cluster_yaml(tmp_path / "cluster.yaml", {},
                           k8s={**K8S, "image": "https://FAKE-SECRET-3c3c@registry.example.com/vlpt:1"})
    rc = main(["launch", "k8s", "--config", DEMO, "--cluster", str(cluster), "--out", str(tmp_path / "out")])
    assert_refused(rc, capsys.readouterr().err, "k8s.image")


# ---------------------------------------------------------------- DeepSpeed over pdsh

def fake_tools(bin_dir: Path, record: Path) -> None:
    """`ssh` that always succeeds and `pdsh` that records its argv: the command DeepSpeed sends to the hosts."""
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "pdsh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)


def test_multinode_deepspeed_puts_no_credential_on_pdsh_command_line(tmp_path):
    cluster = cluster_yaml(tmp_path / "cluster.yaml", {"NCCL_DEBUG": "WARN"})
    work = tmp_path / "work"  # launch.sh runs DeepSpeed here; its ./.deepspeed_env is read
    work.mkdir()
    proc = vlpt(["launch", "deepspeed", "--config", DEMO, "--cluster", str(cluster), "--out", str(tmp_path / "out"),
                 f"--train.run_dir={tmp_path}/run"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    record = tmp_path / "pdsh-argv.txt"
    fake_tools(tmp_path / "bin", record)
    env = {**subprocess_env(), **PROCESS_ENV, "HOME": str(tmp_path / "home"),
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "MLFLOW_EXPERIMENT_NAME": "kept"}
    ran = subprocess.run(["bash", str(tmp_path / "out" / "launch.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    sent = record.read_text()
    assert "deepspeed.launcher.launch" in sent and "MLFLOW_EXPERIMENT_NAME=kept" in sent  # the exports work
    assert not any(m in sent for m in SECRET_MARKERS), sent
    assert not any(m in ran.stdout + ran.stderr for m in SECRET_MARKERS), ran.stderr[-3000:]
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI", "PYTHON_FAKE_PASSWORD"):
        assert f"{name}=" not in sent and name in ran.stderr  # said once, without the value


@pytest.mark.parametrize("where", ["home", "workdir"])
def test_credential_in_deepspeed_env_file_is_refused(where, tmp_path, monkeypatch, capsys):
    """DeepSpeed sends each line of ~/.deepspeed_env and ./.deepspeed_env over pdsh's command line."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    env_file = (home if where == "home" else work) / ".deepspeed_env"
    env_file.write_text("NCCL_DEBUG=WARN\nMLFLOW_TRACKING_PASSWORD=FAKE-SECRET-4d4d-dsenv\n")
    cluster = cluster_yaml(tmp_path / "cluster.yaml", {})
    args = ["launch", "deepspeed", "--config", DEMO, "--cluster", str(cluster), "--out", str(tmp_path / "out"),
            f"--train.run_dir={tmp_path}/run"]
    assert_refused(main(args), capsys.readouterr().err, str(env_file), "MLFLOW_TRACKING_PASSWORD", "own environment")
    assert not (tmp_path / "out").exists()
    env_file.write_text("NCCL_DEBUG=WARN\nMLFLOW_EXPERIMENT_NAME=vlpt\n")  # plain settings are fine
    assert main(args) == 0


def test_deepspeed_export_prefixes_cover_the_installed_launcher():
    """launch.sh filters the variables DeepSpeed's runner forwards; its list must cover this DeepSpeed's."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    from cluster.secrets import DEEPSPEED_EXPORT_PREFIXES

    assert set(runner.EXPORT_ENVS) | {"NCCL"} <= set(DEEPSPEED_EXPORT_PREFIXES)


# ---------------------------------------------------------------- acceptance: grep every output

def grep_secrets(texts: dict[str, bytes]) -> list[str]:
    return [f"{where}: {secret}" for where, data in texts.items() for secret in ALL_SECRETS + SECRET_MARKERS
            if secret.encode() in data]


@pytest.mark.slow
def vlpt_in_process(args: list[str], env: dict, capfd) -> tuple[int, bytes]:
    """`vlpt <args>` in this process with `env` added, and everything written to its stdout and
    stderr file descriptors (print, logging, warnings alike)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        rc = main(args)
    out, err = capfd.readouterr()
    return rc, (out + err).encode()


def test_planted_secrets_appear_in_no_output(tmp_path, demo_data, s3_server, capfd):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    printed: dict[str, bytes] = {}
    env = {**PROCESS_ENV, "AWS_SESSION_TOKEN": "FAKE-SECRET-5e6f-session"}
    bucket = make_bucket(s3_server.endpoint_url, "secrets-ckpt")
    run_dir = outputs / "run"
    cfg = write_tiny_config(inputs / "c.yaml", demo_data, run_dir, tracking={"enabled": True},
                            storage={"s3": {"endpoint_url": s3_server.endpoint_url, "max_retries": 1}},
                            train={"checkpoint_s3": f"s3://{bucket}/run", "save_every": 3})
    good_cluster = cluster_yaml(inputs / "good.yaml", {"NCCL_DEBUG": "WARN"})
    for target in ("slurm", "k8s", "deepspeed", "local"):  # every render, the environment full of secrets
        extra = {"local": ["--nodes", "1"], "k8s": ["--train.run_dir=/workspace/vlpt/runs/secrets"]}.get(target, [])
        for mode in (["--dry-run"], []):
            rc, printed[f"launch {target} {mode}"] = vlpt_in_process(
                ["launch", target, "--config", str(cfg), "--cluster", str(good_cluster), *extra,
                 "--out", str(outputs / f"launch-{target}"), *mode], env, capfd)
            assert rc == 0, printed[f"launch {target} {mode}"][-3000:]
    for name, value in ENV_CREDENTIALS.items():  # every refusal
        bad = cluster_yaml(inputs / f"bad-{name}.yaml", {name: value})
        _, printed[f"refused env {name}"] = vlpt_in_process(
            ["launch", "slurm", "--config", str(cfg), "--cluster", str(bad), "--out", str(outputs / "refused"),
             "--dry-run"], env, capfd)
    for key, value in URL_USERINFO.items():
        _, printed[f"refused {key}"] = vlpt_in_process(["config", "--config", str(cfg), f"--{key}={value}"],
                                                       env, capfd)
    # One render as its own process too (nothing in-process-only hides a leak).
    proc = vlpt(["launch", "deepspeed", "--config", str(cfg), "--cluster", str(good_cluster), "--dry-run"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed["launch deepspeed subprocess"] = (proc.stdout + proc.stderr).encode()
    # A real run: boto3 signs its checkpoint uploads with the planted AWS credentials.
    proc = run_vlpt(["pretrain", "--config", str(cfg)], env=env)
    printed["pretrain"] = (proc.stdout + proc.stderr).encode()
    assert (run_dir / "summary.json").is_file() and (run_dir / "mlflow.db").is_file()
    remote = s3_test_client(s3_server.endpoint_url).list_objects_v2(Bucket=bucket).get("Contents", [])
    assert any(obj["Key"].endswith("config.yaml") for obj in remote)
    files = {str(p): p.read_bytes() for p in outputs.rglob("*") if p.is_file()}
    assert any(p.endswith("job.sbatch") for p in files) and any(p.endswith("pytorchjob.yaml") for p in files)
    assert any(p.endswith("launch.sh") for p in files) and any("checkpoint" in p for p in files)
    uploaded = {f"s3://{bucket}/{o['Key']}": s3_test_client(s3_server.endpoint_url).get_object(
        Bucket=bucket, Key=o["Key"])["Body"].read() for o in remote}
    assert not grep_secrets({**files, **uploaded, **printed})
    assert not (outputs / "refused").exists()
