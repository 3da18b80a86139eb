"""Shared fixtures: tiny demo shards, tiny configs, and running `vlpt` in subprocesses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The kernel tests run the Triton kernels on CPU in Triton's interpreter, which Triton
# honours only if it is requested before Triton is imported; a GPU machine keeps the
# compiler (run `TRITON_INTERPRET=1 pytest tests/kernels` there for the CPU half).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from data.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(str(out), seed=0, n_train_scenes=240, n_val_scenes=40, img_dim=16,
                       scenes_per_shard=40)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def process_group():
    """One gloo process group (world size 1) for the whole session, as the launchers set up.

    Session-scoped because DeepSpeed caches the group: one destroyed mid-session breaks
    later in-process engines ("Group ... is not registered")."""
    import torch

    deepspeed = pytest.importorskip("deepspeed")
    created = not torch.distributed.is_initialized()
    if created:
        saved = dict(os.environ)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        try:
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        finally:
            # The rendezvous variables are only needed to connect; left set, they would leak into
            # `vlpt` subprocesses of other tests and point them at this process's port.
            os.environ.clear()
            os.environ.update(saved)
    yield deepspeed
    if created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def write_tiny_config(path: Path, data_dir: Path, run_dir: Path, **sections) -> Path:
    """A tiny UNITER run on the test shards; `sections` deep-override (e.g. optim={...})."""
    import yaml

    from data.tokenizer import load_tokenizer
    from trainer.config_files import deep_merge

    vocab = str(REPO / "data/vocab/demo-vocab.txt")
    cfg = {
        "model": {**TINY_MODEL, "vocab_size": load_tokenizer(vocab).vocab_size, "img_dim": 16,
                  "img_label_dim": 9},
        "data": {"train": str(data_dir / "train"), "val": str(data_dir / "val"),
                 "tokenizer": {"path": vocab, "lowercase": False},
                 "micro_batch_size": 8, "val_batch_size": 20, "shuffle_buffer": 32},
        "tasks": {"mlm": 1, "itm": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "log_every": 1, "progress": False,
                  "seed": 7},
        "tracking": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(deep_merge(cfg, sections)))
    return path


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="session")
def pixel_data(tmp_path_factory) -> Path:
    """The demo scenes drawn as 32-px pictures (vlpt-pixels-v2 shards: a picture per scene) for tiny ALBEF runs."""
    from data.demo_pixels import write_demo_pixels

    out = tmp_path_factory.mktemp("pixels")
    write_demo_pixels(str(out), seed=0, n_train_scenes=48, n_val_scenes=10, scenes_per_shard=12, image_size=32)
    return out


def write_albef_config(tmp_path: Path, data: Path, name: str, steps: int, **sections) -> Path:
    """A tiny fp32 ALBEF run (hidden 32, 1 text + 1 fusion layer, 2-layer ViT on 32 px, no dropout)
    writing to tmp_path/name; `sections` are merged over it."""
    import yaml

    from data.tokenizer import load_tokenizer
    from trainer.config_files import deep_merge

    vocab = str(REPO / "data/vocab/demo-vocab.txt")
    cfg = {
        "model": {"arch": "albef", "vocab_size": load_tokenizer(vocab).vocab_size, "hidden_size": 32,
                  "num_attention_heads": 2, "intermediate_size": 64, "text_layers": 1, "fusion_layers": 1,
                  "max_position_embeddings": 32, **NO_DROPOUT, "image_size": 32, "patch_size": 16,
                  "vision_width": 32, "vision_layers": 2, "vision_heads": 2, "vision_mlp": 64, "embed_dim": 16, "queue_size": 48, "alpha_warmup_steps": 4, "k_test": 8,
                  "initializer_range": 0.1},
        "data": {"train": str(data / "train"), "val": str(data / "val"),
                 "tokenizer": {"path": vocab, "lowercase": False}, "micro_batch_size": 8,
                 "val_batch_size": 16, "shuffle_buffer": 32, "max_txt_len": 23,
                 "albef": {"pixels": {"image_size": 32}}},
        "tasks": {"albef": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "global_batch_size": 16, "weight_decay": 0.02},
        "train": {"run_dir": str(tmp_path / name), "max_steps": steps, "log_every": 1, "progress": False,
                  "seed": 3},
        "tracking": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(deep_merge(cfg, sections)))
    return path


def write_albef_retrieval_config(tmp_path: Path, data: Path, name: str, steps: int, init_from: Path,
                                 task: str = "retrieval", **sections) -> Path:
    """The tiny ALBEF run of `write_albef_config`, fine-tuned on `task` from `init_from`."""
    import yaml
    from trainer.config_files import deep_merge

    path = write_albef_config(tmp_path, data, name, steps, stage="finetune")
    raw = yaml.safe_load(path.read_text())
    raw["tasks"] = {task: 1}
    raw = deep_merge(raw, {"finetune": {"init_from": str(init_from) if init_from else None}})
    raw = deep_merge(raw, sections)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def pixel_tasks(tmp_path_factory, pixel_data) -> Path:
    """The demo task folders of the pixel fixture's scenes (seed 0, 48 + 10 scenes, img_dim 64, noise 0.5):
    `<pixel_tasks>/<task>/{train,val}`, their pictures in `pixel_data`."""
    from data.tasks.demo import write_demo_tasks

    out = tmp_path_factory.mktemp("pixel_tasks")
    write_demo_tasks(out, seed=0, n_train_scenes=48, n_val_scenes=10, img_dim=64, noise_std=0.5)
    return out


@pytest.fixture(scope="session")
def albef_pretrained(tmp_path_factory, pixel_data) -> Path:
    """A tiny ALBEF pretraining run (2 steps) the downstream tests fine-tune from."""
    tmp = tmp_path_factory.mktemp("albef_pre_downstream")
    run_vlpt(["pretrain", "--config", str(write_albef_config(tmp, pixel_data, "pre", 2))])
    return tmp / "pre"


def write_albef_task_config(tmp_path: Path, pixel_data: Path, tasks: Path, task: str, name: str, steps: int,
                            init_from: Path | None, folder: str | None = None, finetune: dict | None = None,
                            **sections) -> Path:
    """The tiny ALBEF run fine-tuned on the task folders `tasks/<folder or task>/{train,val}` joined to
    `pixel_data`; `finetune`: more keys of that section."""
    folders = tasks / (folder or task)
    finetune = {"train": str(folders / "train"), "val": str(folders / "val"),
                "features": [str(pixel_data / "train"), str(pixel_data / "val")], "eval_batch_size": 16,
                **(finetune or {})}
    return write_albef_retrieval_config(tmp_path, pixel_data, name, steps, init_from, task=task,
                                        finetune=finetune, **sections)


def write_equivalence_config(tmp_path: Path, data_dir: Path, name: str, zero_stage: int = 0, **train) -> Path:
    """A run whose losses must not depend on how it is launched: global batch 16 (however the
    processes and accumulation split it), no dropout (per-process randomness), lr 1e-2 from step 1."""
    return write_tiny_config(tmp_path / f"{name}.yaml", data_dir, tmp_path / name, model=NO_DROPOUT,
                             optim={"global_batch_size": 16, "lr": 1e-2, "warmup_steps": 0},
                             parallel={"zero_stage": zero_stage}, train=train)


def subprocess_env(nthreads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(nthreads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_vlpt(args: list[str], launcher: str = "python", nproc: int = 1, timeout: int = 600,
             check: bool = True, env: dict | None = None, module: str = "vlpt",
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `vlpt <args>` as one process, under torchrun, or under the DeepSpeed launcher;
    `module`: a test wrapper of the CLI (e.g. one that injects a fault) instead; `cwd`: the
    working directory (default: the repository)."""
    bin_dir = Path(sys.executable).parent
    if launcher == "python":
        cmd = [sys.executable, "-m", module, *args]
    elif launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               "-m", module, *args]
    elif launcher == "deepspeed":
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "--module", module, *args]
    else:
        raise AssertionError(launcher)
    proc = subprocess.run(cmd, cwd=cwd or REPO, env={**subprocess_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss of each step (whatever its task), last record per step; steps skipped
    for a non-finite loss have none."""
    out = {}
    for rec in read_metrics(run_dir):
        if f"{rec.get('task')}_loss" in rec:
            out[rec["step"]] = rec[f"{rec['task']}_loss"]
    return out


# ---------------------------------------------------------------- S3 (moto server, fault proxy)

S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
# Would otherwise steer boto3 away from the fake credentials or the local endpoint.
S3_TEST_ENV_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class S3Server:
    """A running moto S3 server (`endpoint_url`); credentials come from the environment."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url

    def client(self):
        return s3_test_client(self.endpoint_url)


def s3_test_client(endpoint_url: str):
    """A plain boto3 client on `endpoint_url`, credentials from the standard chain (env)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server in a subprocess, fake credentials in os.environ meanwhile."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from tests.s3_server import start_moto_server

    saved = {k: os.environ.get(k) for k in (*S3_TEST_ENV, *S3_TEST_ENV_UNSET)}
    empty = tmp_path_factory.mktemp("aws_config") / "none"
    os.environ.update(S3_TEST_ENV)
    for k in S3_TEST_ENV_UNSET:
        os.environ.pop(k, None)
    # No ~/.aws files of whoever runs the tests: point the shared files at nothing.
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    try:
        endpoint_url, stop = start_moto_server()
        try:
            yield S3Server(endpoint_url)
        finally:
            stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def fault_proxy(s3_server):
    """A FaultProxy in front of the moto server, no faults planned; closed afterwards."""
    from tests.s3_server import FaultProxy

    proxy = FaultProxy(s3_server.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.close()


def make_bucket(endpoint_url: str, name: str) -> str:
    """Create bucket `name` (no error if it exists already); returns the name."""
    client = s3_test_client(endpoint_url)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return name


def upload_dir(endpoint_url: str, local_dir, bucket: str, prefix: str = "") -> list[str]:
    """Upload every file under `local_dir` to s3://bucket/prefix/<relative path>, directly to
    `endpoint_url` (the moto server, not a proxy); returns the keys, sorted."""
    client = s3_test_client(endpoint_url)
    root = Path(local_dir)
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys
