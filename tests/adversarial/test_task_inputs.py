"""Hostile downstream inputs (docs/downstream.md): a FIFO or a link where a feature shard should be, a
shard whose `.npz` is a link, and a RefCOCO pickle asking to run a command, through `vlpt tasks`.
Nothing blocks, nothing is followed, nothing runs; each is counted or refused with one line."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from collections import Counter

import pytest

from data.tasks.features import FeatureStore, _index_shard
from vlpt.cli import main


def _copy_regions(src, dst):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    first = manifest["shards"][0]
    return dst / (first["path"] if isinstance(first, dict) else first)


def test_a_fifo_or_a_link_in_place_of_a_shard_is_refused_and_never_opened(demo_data, tmp_path):
    shard = _copy_regions(demo_data / "val", tmp_path / "regions")
    os.remove(shard)
    os.mkfifo(shard)  # a blocking open would hang the run forever
    with pytest.raises(ValueError, match="not a regular file"):  # the manifest check, one line
        FeatureStore([str(tmp_path / "regions")], img_dim=16)
    skipped: Counter = Counter()
    assert _index_shard(str(shard), skipped) == {} and skipped == {"not_a_file": 1}  # swapped in after the check
    os.remove(shard)
    os.symlink("/etc/passwd", shard)
    with pytest.raises(ValueError, match="outside"):
        FeatureStore([str(tmp_path / "regions")], img_dim=16)
    os.remove(shard)
    skipped.clear()
    assert _index_shard(str(shard), skipped) == {} and skipped == {"missing_shard": 1}


def test_a_link_member_is_never_followed(demo_data, tmp_path):
    shard = _copy_regions(demo_data / "val", tmp_path / "regions")
    with tarfile.open(shard, "r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    meta = next(m for m, _ in members if m.name.endswith(".json"))
    key = meta.name.split(".")[0]
    image_id = json.loads(dict((m.name, d) for m, d in members)[meta.name])["image_id"]
    with tarfile.open(shard, "w:") as tar:
        for m, data in members:
            if m.name == f"{key}.npz":  # the image's features become a link to a file outside
                link = tarfile.TarInfo(m.name)
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(link)
                continue
            tar.addfile(m, io.BytesIO(data))
    store = FeatureStore([str(tmp_path / "regions")], img_dim=16)
    regions, reason = store.get(image_id)
    # the link is skipped: the image is found in a later sample of the same image, or not at all
    assert reason in (None, "unknown_image")
    assert regions is None or regions.img_feat.shape[1] == 16


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_vlpt_tasks_refcoco_refuses_a_pickle_that_runs_a_command(tmp_path, capsys):
    marker = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _Evil(marker)}], protocol=2))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": []}))
    code = main(["tasks", "refcoco", "--refs", str(refs), "--instances", str(instances), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "o").exists()
