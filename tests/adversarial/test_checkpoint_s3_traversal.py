"""A hostile `train.checkpoint_s3` prefix cannot write or delete outside the run dir.

Keys under a checkpoint tag must be known checkpoint file names, and `latest` must name a
`step_<8 digits>` tag: anything else (`..`, an absolute path, a separator) refuses the whole
download with one line, before a file is written. A stray unknown key beside a valid
checkpoint also refuses it: a checkpoint prefix holds nothing else, so it was tampered with.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import make_bucket, run_vlpt, s3_test_client, write_tiny_config
from trainer import checkpoint_files

BUCKET, PREFIX = "vlpt-adv", "runs/a"
TAG = "step_00000002"


# ---------------------------------------------------------------- the one path function


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_3_mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "bf16_zero_pp_rank_12_mp_rank_01_optim_states.pt", "trainer_state.json",
                                  "config.yaml", "rng_rank0.pt", "rng_rank15.pt", "teacher.pt", "zero_to_fp32.py"])
def test_known_checkpoint_files_resolve_inside_the_tag(tmp_path, name):
    path = checkpoint_files.checkpoint_file_path(str(tmp_path), TAG, name, "test")
    assert path == os.path.join(str(tmp_path), TAG, name)


@pytest.mark.parametrize("tag, name", [
    ("step_00000002", "../../x"), ("step_00000002", "/etc/passwd"), ("step_00000002", "sub/rng_rank0.pt"),
    ("step_00000002", "evil.pt"), ("step_00000002", "rng_rank0.pt/.."), ("step_00000002", ".."),
    ("step_00000002", "rng_rank0.pt\n"), ("step_00000002", "trainer_state.json\\..\\x"),
    ("../../victim", "trainer_state.json"), ("/abs/path", "trainer_state.json"),
    ("step_1/../..", "trainer_state.json"), ("step_1", "trainer_state.json"), ("step_0000000２", "config.yaml"),
    ("", "config.yaml"), ("step_00000002/", "config.yaml"),
])
def test_anything_else_is_refused_with_one_line(tmp_path, tag, name):
    with pytest.raises(ValueError) as err:
        checkpoint_files.checkpoint_file_path(str(tmp_path), tag, name, "s3://b/p")
    assert len(str(err.value).splitlines()) == 1 and "s3://b/p" in str(err.value)


@pytest.mark.parametrize("body", ["../../victim", "/abs/path", "step_1/../..", "step_00000002/../../victim"])
def test_local_latest_pointer_is_validated(tmp_path, body):
    root = tmp_path / "checkpoints"
    (root / TAG).mkdir(parents=True)
    (root / TAG / checkpoint_files.STATE_FILE).write_text("{}")
    (root / "latest").write_text(body)
    with pytest.raises(ValueError, match="latest"):
        checkpoint_files.latest_tag(str(tmp_path))


# ---------------------------------------------------------------- through a real S3 server


def fake_checkpoint(folder) -> None:
    """The file names of a ZeRO-0 checkpoint (downloading never unpickles them)."""
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt", "config.yaml", checkpoint_files.STATE_FILE):
        (folder / name).write_text(name)


def put(url: str, key: str, body: bytes | str) -> None:
    s3_test_client(url).put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=body)


def fresh_prefix(url: str, tmp_path) -> None:
    """A legitimate upload of one checkpoint at s3://BUCKET/PREFIX."""
    make_bucket(url, BUCKET)
    client = s3_test_client(url)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    local = tmp_path / "legit"
    fake_checkpoint(local / TAG)
    for path in sorted((local / TAG).iterdir()):
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{TAG}/{path.name}")
    put(url, "latest", TAG)


def fetch(url: str, run_dir, demo_data, tmp_path) -> bool:
    from trainer.config import load_config
    from trainer.run import Run

    cfg = load_config(str(write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, storage={"s3": {
        "endpoint_url": url, "max_retries": 1}}, train={"checkpoint_s3": f"s3://{BUCKET}/{PREFIX}"})))
    run = Run(cfg, None, None, None, None, None, "")  # fetch_from_s3 reads only the config and run_dir
    return run.fetch_from_s3()


def test_a_legitimate_upload_is_downloaded(tmp_path, demo_data, s3_server, outside_guard):
    _, run_dir = outside_guard
    fresh_prefix(s3_server.endpoint_url, tmp_path)
    assert fetch(s3_server.endpoint_url, run_dir, demo_data, tmp_path)
    assert (run_dir / "checkpoints" / "latest").read_text() == TAG
    assert sorted(p.name for p in (run_dir / "checkpoints" / TAG).iterdir()) == \
        sorted(["mp_rank_00_model_states.pt", "rng_rank0.pt", "config.yaml", checkpoint_files.STATE_FILE])


ATTACKS = {
    "dotdot_key": {f"{TAG}/../../../../x": "pwned"},
    "dotdot_latest": {"latest": "../../victim", "../../victim/trainer_state.json": "{}",
                      "../../victim/precious.txt": "replaced"},
    "absolute_latest": {"latest": "/abs/path", "/abs/path/trainer_state.json": "{}"},
    "tag_then_dotdot_latest": {"latest": "step_1/../..", "step_1/../../trainer_state.json": "{}"},
    "unknown_file_beside_checkpoint": {f"{TAG}/notes.txt": "hello"},
    "nested_file": {f"{TAG}/sub/rng_rank0.pt": "x"},
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_keys_or_latest_refuse_the_download(tmp_path, demo_data, s3_server, outside_guard, attack):
    parent, run_dir = outside_guard
    url = s3_server.endpoint_url
    fresh_prefix(url, tmp_path)
    for key, body in ATTACKS[attack].items():
        put(url, key, body)
    with pytest.raises(ValueError) as err:
        fetch(url, run_dir, demo_data, tmp_path)
    assert len(str(err.value).splitlines()) == 1 and f"s3://{BUCKET}/{PREFIX}" in str(err.value)
    root = run_dir / "checkpoints"
    assert not (root / "latest").exists() and not (root / TAG).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(checkpoint_files.TMP_PREFIX)] if root.exists() else True
    assert not list(tmp_path.rglob("x"))  # `../../../../x` climbs above `parent` too


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["dotdot_key", "dotdot_latest"])
def test_vlpt_pretrain_refuses_a_hostile_mirror_with_one_line(tmp_path, demo_data, s3_server, outside_guard,
                                                              attack):
    parent, run_dir = outside_guard
    url = s3_server.endpoint_url
    fresh_prefix(url, tmp_path)
    for key, body in ATTACKS[attack].items():
        put(url, key, body)
    cfg = write_tiny_config(tmp_path / "p.yaml", demo_data, run_dir, storage={"s3": {"endpoint_url": url,
                                                                                     "max_retries": 1}},
                            train={"checkpoint_s3": f"s3://{BUCKET}/{PREFIX}", "max_steps": 2})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlpt: error: train.checkpoint_s3=s3://vlpt-adv/runs/a"), last
    assert not list(tmp_path.rglob("x"))
    assert (parent / "victim" / "precious.txt").read_text() == "do not touch\n"
