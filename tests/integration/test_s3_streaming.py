"""Streaming shards from a real S3 API (moto's server): a full epoch under injected faults,
resume at a byte offset, and `vlpt pretrain` on s3:// URLs."""
import itertools
import json
from collections import Counter

import pytest

from data.shards import iter_shard, read_manifest
from data.storage import S3Options
from tests.conftest import make_bucket, read_metrics, run_vlpt, upload_dir, write_tiny_config
from tests.loader_util import UNEQUAL_SIZES, make_loader, spec_for, take, write_sized_shards

pytestmark = pytest.mark.timeout(600)
FAULTS = ("reset", "slowdown", "truncate", "stall")


@pytest.fixture(scope="module")
def s3_seven(s3_server, tmp_path_factory):
    """The 7 unequal shards, locally and uploaded to s3://vlpt-test/seven."""
    local = write_sized_shards(tmp_path_factory.mktemp("seven"), UNEQUAL_SIZES)
    make_bucket(s3_server.endpoint_url, "vlpt-test")
    upload_dir(s3_server.endpoint_url, local, "vlpt-test", "seven")
    return local, "s3://vlpt-test/seven"


def opts(endpoint: str) -> S3Options:
    return S3Options(endpoint_url=endpoint, read_timeout_s=1.0, backoff_base_s=0.01, backoff_cap_s=0.05)


def every_third_get_faulty(proxy):
    """Cycle the four fault kinds over every third object GET (mid-body cuts)."""
    kinds, counter = itertools.cycle(FAULTS), itertools.count()
    proxy.plan(policy=lambda req: next(kinds) if next(counter) % 3 == 0 else None)


def test_epoch_under_faults_sees_each_key_exactly_once(s3_seven, fault_proxy):
    local, url = s3_seven
    s3 = opts(fault_proxy.url)
    dataset_keys = Counter(raw["__key__"] for path in read_manifest(local).shards for raw in iter_shard(path))
    spec = spec_for(url, s3=s3, n_streams=2, epochs=1, shuffle_buffer=16)
    every_third_get_faulty(fault_proxy)
    loaders = [make_loader(spec, [rank]) for rank in range(2)]
    seen = Counter(k for loader in loaders for batch in loader for k in batch["keys"])
    assert seen == dataset_keys  # nothing lost, nothing repeated
    retries = sum((Counter(loader.retries) for loader in loaders), Counter())
    assert set(fault_proxy.injected) == set(FAULTS)
    assert retries == Counter({"s3_retry_connection": fault_proxy.injected["reset"],
                               "s3_retry_throttled": fault_proxy.injected["slowdown"],
                               "s3_retry_truncated": fault_proxy.injected["truncate"],
                               "s3_retry_read_timeout": fault_proxy.injected["stall"]})
    assert not any(loader.skip_counts for loader in loaders)  # faults are not bad samples


def test_resume_over_s3_reopens_mid_shard_and_matches_local(s3_seven, fault_proxy):
    local, url = s3_seven
    remote = spec_for(url, s3=opts(fault_proxy.url), shuffle_buffer=0, batch_size=4)
    whole = take(make_loader(spec_for(local, shuffle_buffer=0, batch_size=4), [0]), 12)
    first = make_loader(remote, [0])
    head = take(first, 5)
    state = first.state_dict()
    assert state["readers"]["0"]["source"]["offset"] > 0  # mid-shard: resumed by a ranged GET
    every_third_get_faulty(fault_proxy)
    resumed = make_loader(remote, [0], state=state)
    assert head + take(resumed, 7) == whole
    ranged = [entry for entry in fault_proxy.log if entry[0] == "GET" and entry[2]]
    assert ranged  # the resumed shard was opened at the block's byte offset


@pytest.mark.slow
def test_pretrain_streams_s3_urls(s3_server, demo_data, tmp_path):
    make_bucket(s3_server.endpoint_url, "vlpt-demo")
    upload_dir(s3_server.endpoint_url, demo_data, "vlpt-demo", "demo")
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir,
                            data={"train": "s3://vlpt-demo/demo/train", "val": "s3://vlpt-demo/demo/val"},
                            storage={"s3": {"endpoint_url": s3_server.endpoint_url}},
                            train={"max_steps": 20, "log_every": 5, "val_every": 0})
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    assert "vlpt pretrain: done" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and "val/mlm_acc" in summary
    losses = [r["mlm_loss"] for r in read_metrics(run_dir) if "mlm_loss" in r]
    assert losses and all(loss == loss for loss in losses)
    # The credentials came from the environment only: nothing of them in the saved config.
    saved = (run_dir / "config.yaml").read_text()
    assert "testing" not in saved and "endpoint_url" in saved


def test_bench_data_reports_local_and_s3_throughput_and_padding(s3_seven, s3_server, tmp_path, capsys):
    from vlpt.cli import main

    local, url = s3_seven
    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data", str(local), "--s3", url, "--endpoint-url", s3_server.endpoint_url,
                 "--vocab", "data/vocab/demo-vocab.txt", "--batch-size", "8", "--token-budget", "400",
                 "--shuffle-buffer", "64", "--workers", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    total = read_manifest(local).num_samples
    assert [r["source"] for r in result["throughput"]] == [str(local), url]
    assert all(r["samples"] == total and r["samples_per_s"] > 0 for r in result["throughput"])
    pad = result["padding"]
    assert 0 <= pad["token_buckets"] < pad["fixed_size"] < 1
    assert pad["buckets_max_batch"] % 8 == 0
    assert "padding: fixed-size batches" in capsys.readouterr().out


def test_unreachable_or_missing_s3_manifest_is_one_line(s3_server, demo_data, tmp_path):
    make_bucket(s3_server.endpoint_url, "vlpt-empty")
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run",
                            data={"train": "s3://vlpt-empty/nothing", "val": None},
                            storage={"s3": {"endpoint_url": s3_server.endpoint_url}})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.train: manifest not found: s3://vlpt-empty/nothing/manifest.json" in proc.stderr
