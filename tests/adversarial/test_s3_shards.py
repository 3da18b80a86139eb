"""S3 manifests stay in their bucket and prefix, vanished objects are skipped and counted after a
few retries, and a dead endpoint gives its one-line error within the configured time."""
import json
import socket
import time

import pytest

from data.demo_scenes import LABEL_DIM
from data.loader import StreamReader
from data.shards import read_manifest, write_manifest, write_shard
from data.sources import DatasetShards
from data.storage import S3Options
from tests.bad_input_data import IMG_DIM, good_samples
from tests.conftest import make_bucket, run_vlpt, s3_test_client, upload_dir, write_tiny_config
from tests.loader_util import spec_for, tokenizer

pytestmark = pytest.mark.timeout(300)
BUCKET = "vlpt-adversarial"


def fast(endpoint: str, **kw) -> S3Options:
    return S3Options(endpoint_url=endpoint, read_timeout_s=1.0, backoff_base_s=0.01, backoff_cap_s=0.05, **kw)


def put_dataset(s3_server, local, prefix: str, n=(6, 4), paths=None):
    shards = [local / f"shard-{i:06d}.tar" for i in range(len(n))]
    pool = good_samples(sum(n))
    counts = [write_shard(p, pool[sum(n[:i]):sum(n[:i + 1])]) for i, p in enumerate(shards)]
    manifest = write_manifest(local, shards, {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts)
    if paths is not None:
        for entry, path in zip(manifest["shards"], paths):
            entry["path"] = path
        (local / "manifest.json").write_text(json.dumps(manifest))
    make_bucket(s3_server.endpoint_url, BUCKET)
    upload_dir(s3_server.endpoint_url, local, BUCKET, prefix)
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("where", ["/etc/passwd", "file:///etc/passwd", "../other/shard-000000.tar",
                                   "s3://another-bucket/shard-000000.tar", "a/../../other/x.tar"])
def test_s3_manifest_cannot_leave_its_prefix(s3_server, tmp_path, where):
    url = put_dataset(s3_server, tmp_path, f"escape-{abs(hash(where))}", paths=[where])
    s3 = fast(s3_server.endpoint_url)
    with pytest.raises(ValueError, match="outside"):
        read_manifest(url, s3=s3)
    assert read_manifest(url, s3=s3, allow_outside=True).shards[0] == (where if "://" in where or where[0] == "/"
                                                                       else f"{url}/{where}")


def test_vanished_objects_are_retried_then_skipped_and_counted(s3_server, tmp_path):
    local = tmp_path / "d"
    local.mkdir()
    url = put_dataset(s3_server, local, "vanish", n=(6, 4, 4))
    client = s3_test_client(s3_server.endpoint_url)
    client.delete_object(Bucket=BUCKET, Key="vanish/shard-000002.tar")  # listed, never there
    s3 = fast(s3_server.endpoint_url, missing_retries=2)
    manifest = read_manifest(url, s3=s3)
    spec = spec_for(datasets=(DatasetShards.from_manifest("train", manifest),), s3=s3, batch_size=2,
                    shuffle_buffer=0, epochs=2)
    reader = StreamReader(spec, tokenizer(), 0)
    keys = {0: [], 1: []}
    for epoch, _, samples, _ in reader.batches():
        keys[epoch] += [s.key for s in samples]
        if epoch == 0 and len(keys[0]) == 10:  # the end of epoch 0: a second object goes away
            client.delete_object(Bucket=BUCKET, Key="vanish/shard-000001.tar")
    skipped, _, retries = reader.take_counts()
    assert skipped == {"missing_shard": 3}  # epoch 0: one, epoch 1: two
    assert retries == {"s3_retry_missing": 3 * 2}
    assert len(keys[0]) == 10 and len(keys[1]) == 6


@pytest.fixture
def dead_endpoint():
    """A TCP port that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_dead_endpoint_fails_within_the_retry_budget(dead_endpoint, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = S3Options(endpoint_url=dead_endpoint, connect_timeout_s=0.5, read_timeout_s=0.5, max_total_retry_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="giving up"):
        read_manifest("s3://bucket/data", s3=s3)
    assert time.monotonic() - t0 < 2.0 + 0.5 + 2.0


def test_dead_endpoint_default_budget_is_under_two_minutes():
    s3 = S3Options()
    assert s3.max_total_retry_s + s3.read_timeout_s + s3.connect_timeout_s < 120


def test_pretrain_on_dead_endpoint_is_one_line(dead_endpoint, tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run",
                            data={"train": "s3://bucket/train", "val": None},
                            storage={"s3": {"endpoint_url": dead_endpoint, "connect_timeout_s": 0.5,
                                            "read_timeout_s": 0.5, "max_total_retry_s": 2.0}})
    t0 = time.monotonic()
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False, timeout=120,
                    env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlpt: error: data.train:") and "giving up" in last
    assert elapsed < 60, elapsed
