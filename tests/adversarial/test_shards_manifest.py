"""Manifests are not trusted: shard paths stay inside the manifest's folder, non-regular files are
refused, and counts, sizes and checksums are checked against what is read (skip and count)."""
import json
import logging
import os
import shutil

import pytest

from data.demo_scenes import LABEL_DIM
from data.loader import StreamReader
from data.shards import read_manifest, write_manifest, write_shard
from data.sources import DatasetShards
from tests.bad_input_data import IMG_DIM, good_samples
from tests.conftest import run_vlpt, write_tiny_config
from tests.loader_util import spec_for, tokenizer

META = {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}


def two_shards(directory, n=(6, 4)):
    paths = [directory / f"shard-{i:06d}.tar" for i in range(len(n))]
    pool = good_samples(sum(n))
    counts = [write_shard(p, pool[sum(n[:i]):sum(n[:i + 1])]) for i, p in enumerate(paths)]
    write_manifest(directory, paths, META, counts)
    return paths


def set_shard_paths(directory, paths):
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry, path in zip(manifest["shards"], paths):
        entry["path"] = path
    (directory / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(directory, index, **fields):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][index].update(fields)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def read_epoch(directory, **spec):
    manifest = read_manifest(directory)
    ds = (DatasetShards.from_manifest("train", manifest),)
    reader = StreamReader(spec_for(datasets=ds, batch_size=2, shuffle_buffer=0, epochs=1, **spec), tokenizer(), 0)
    keys = [s.key for _, _, samples, _ in reader.batches() for s in samples]
    return keys, reader.take_counts()[0]


@pytest.mark.parametrize("where", ["../outside/victim/precious.txt", "{outside}/victim/precious.txt",
                                   "file://{outside}/victim/precious.txt", "/etc/passwd", "link/precious.txt",
                                   "sub/../../outside/victim/precious.txt"])
def test_shard_path_outside_the_manifest_folder_is_refused(outside_guard, tmp_path, where):
    parent, _ = outside_guard
    data = tmp_path / "data"
    data.mkdir()
    (data / "link").symlink_to(parent / "victim")
    two_shards(data)
    set_shard_paths(data, [where.format(outside=parent)])
    with pytest.raises(ValueError, match="outside"):
        read_manifest(data)
    assert len(read_manifest(data, allow_outside=True).shards) == 2  # explicitly allowed: as before


def test_non_regular_shard_is_refused_at_manifest_read(tmp_path):
    first, _ = two_shards(tmp_path)
    first.unlink()
    os.mkfifo(first)  # opening it would wait forever for a writer
    with pytest.raises(ValueError, match="not a regular file"):
        read_manifest(tmp_path)


def test_shard_turned_into_fifo_after_the_manifest_read_is_skipped(tmp_path):
    first, _ = two_shards(tmp_path)
    manifest = read_manifest(tmp_path)
    first.unlink()
    os.mkfifo(first)
    ds = (DatasetShards.from_manifest("train", manifest),)
    reader = StreamReader(spec_for(datasets=ds, batch_size=2, shuffle_buffer=0, epochs=1), tokenizer(), 0)
    keys = [s.key for _, _, samples, _ in reader.batches() for s in samples]
    assert len(keys) == 4 and reader.take_counts()[0] == {"not_a_file": 1}


def test_missing_shard_is_skipped_and_counted(tmp_path, caplog):
    first, _ = two_shards(tmp_path)
    manifest = read_manifest(tmp_path)
    first.unlink()  # vanished after the manifest was written
    ds = (DatasetShards.from_manifest("train", manifest),)
    reader = StreamReader(spec_for(datasets=ds, batch_size=2, shuffle_buffer=0, epochs=2), tokenizer(), 0)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        keys = [s.key for _, _, samples, _ in reader.batches() for s in samples]
    assert len(keys) == 2 * 4
    assert reader.take_counts()[0] == {"missing_shard": 2}  # once per epoch
    assert sum(str(first) in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("listed", [2, 9])
def test_count_mismatch_is_counted_once(tmp_path, caplog, listed):
    shard = tmp_path / "shard-000000.tar"
    write_shard(shard, good_samples(6))
    write_manifest(tmp_path, [shard], META, counts=[listed])
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        keys, skipped = read_epoch(tmp_path)
    assert len(keys) == min(listed, 6)
    assert skipped == {"manifest_mismatch": 1}
    assert sum("manifest" in r.getMessage() for r in caplog.records) == 1


def test_size_mismatch_is_counted(tmp_path):
    two_shards(tmp_path)
    edit_manifest(tmp_path, 1, bytes=123)
    keys, skipped = read_epoch(tmp_path)
    assert len(keys) == 10 and skipped == {"manifest_mismatch": 1}


def test_sha256_mismatch_skips_the_shard_when_verifying(tmp_path, caplog):
    two_shards(tmp_path)
    edit_manifest(tmp_path, 0, sha256="0" * 64)
    assert read_epoch(tmp_path) [1] == {}  # not verified by default
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        keys, skipped = read_epoch(tmp_path, verify_sha256=True)
    assert len(keys) == 4 and skipped == {"sha256_mismatch": 1}
    assert sum("sha256" in r.getMessage() for r in caplog.records) == 1


def test_pretrain_refuses_an_escaping_manifest_in_one_line(outside_guard, tmp_path, demo_data):
    _, run_dir = outside_guard
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    set_shard_paths(data / "train", ["/etc/passwd"])
    cfg = write_tiny_config(tmp_path / "c.yaml", data, run_dir)
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlpt: error: data.train:") and "outside" in last and "allow_outside_shards" in last


@pytest.mark.parametrize("resampled", [False, True])
def test_cycling_over_only_missing_shards_ends_instead_of_spinning(tmp_path, resampled):
    from data.sources import ShardSource

    paths = two_shards(tmp_path)
    manifest = read_manifest(tmp_path)
    for p in paths:
        p.unlink()
    reported = []
    source = ShardSource(DatasetShards.from_manifest("train", manifest), seed=1, name_id=1, reader=0, n_readers=1,
                         resampled=resampled, cycle=True, s3=None, stats={},
                         on_bad_shard=lambda url, reason, detail: reported.append(reason))
    with pytest.raises(ValueError, match="no readable sample"):
        source.next()
    assert set(reported) == {"missing_shard"} and len(reported) == 2 * 2 + 9
