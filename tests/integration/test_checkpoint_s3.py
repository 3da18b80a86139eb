"""Checkpoints mirrored to S3 (moto server, through boto3 with endpoint_url): uploaded after
each save with keep-last-N, and a run on a machine without the run folder resumes from the
newest upload with the uninterrupted run's losses. An unreachable S3 only warns."""
from __future__ import annotations

import json

import pytest

from tests.conftest import free_port, make_bucket, run_vlpt, s3_test_client, step_losses, write_tiny_config

pytestmark = pytest.mark.slow
COMMON = dict(train={"max_steps": 6, "save_every": 2, "keep_last": 2}, data={"shuffle_buffer": 64})


def s3_config(tmp_path, demo_data, name: str, endpoint_url: str, **train):
    return write_tiny_config(tmp_path / f"{name}.yaml", demo_data, tmp_path / name,
                             data=COMMON["data"],
                             storage={"s3": {"endpoint_url": endpoint_url, "max_retries": 1,
                                             "connect_timeout_s": 1, "read_timeout_s": 5}},
                             train={**COMMON["train"], "checkpoint_s3": "s3://vlpt-ckpt/runs/a", **train})


def remote_keys(endpoint_url: str) -> list[str]:
    listed = s3_test_client(endpoint_url).list_objects_v2(Bucket="vlpt-ckpt", Prefix="runs/a/")
    return sorted(o["Key"][len("runs/a/"):] for o in listed.get("Contents", []))


def test_upload_then_resume_on_a_fresh_machine(tmp_path, demo_data, s3_server):
    url = s3_server.endpoint_url
    make_bucket(url, "vlpt-ckpt")
    full = tmp_path / "full"
    run_vlpt(["pretrain", "--config", str(write_tiny_config(tmp_path / "full.yaml", demo_data, full, **COMMON))])

    first = run_vlpt(["pretrain", "--config", str(s3_config(tmp_path, demo_data, "first", url, stop_after_steps=4))])
    assert "uploaded to s3://vlpt-ckpt/runs/a" in first.stderr
    keys = remote_keys(url)
    assert sorted({k.split("/")[0] for k in keys}) == ["latest", "step_00000002", "step_00000004"]
    local = sorted(p.relative_to(tmp_path / "first" / "checkpoints").as_posix()
                   for p in (tmp_path / "first" / "checkpoints").rglob("*") if p.is_file() and p.name != "latest")
    assert [k for k in keys if k != "latest"] == local  # every file of both checkpoints

    # "Another machine": an empty run folder, the same S3 prefix.
    second = tmp_path / "second"
    proc = run_vlpt(["pretrain", "--config", str(s3_config(tmp_path, demo_data, "second", url))])
    assert "downloaded checkpoint step_00000004 from s3://vlpt-ckpt/runs/a" in proc.stderr
    assert "resumed from step_00000004 at step 4" in proc.stderr
    ref, got = step_losses(full), step_losses(second)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step
    assert sorted({k.split("/")[0] for k in remote_keys(url)}) == ["latest", "step_00000004", "step_00000006"]
    latest = s3_test_client(url).get_object(Bucket="vlpt-ckpt", Key="runs/a/latest")["Body"].read().decode()
    assert latest == "step_00000006"
    assert json.loads((second / "summary.json").read_text())["steps"] == 6


def test_unreachable_s3_warns_and_training_finishes(tmp_path, demo_data):
    closed = f"http://127.0.0.1:{free_port()}"
    proc = run_vlpt(["pretrain", "--config", str(s3_config(tmp_path, demo_data, "offline", closed,
                                                           max_steps=2, save_every=0, resume=False))],
                    env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"})
    assert "checkpoint step_00000002 not uploaded to s3://vlpt-ckpt/runs/a" in proc.stderr
    assert json.loads((tmp_path / "offline" / "summary.json").read_text())["steps"] == 2

