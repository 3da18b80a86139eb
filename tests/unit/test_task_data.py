"""Task folders, the feature store and the downstream loader (data/tasks/): bad and hostile input is
counted, never raised; batches are world-size invariant and resumable."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from data.sources import NoUsableData
from data.tasks.features import FeatureStore
from data.tasks.folder import EXAMPLES, MANIFEST, read_task_folder, write_task_folder
from data.tasks.loader import DownstreamLoader, known_images, steps_from_state


def _vqa(i: int, image: str = "train-scene-000000") -> dict:
    return {"id": f"q{i}", "image_id": image, "text": "what colour is the cube?", "labels": [i % 3], "scores": [1.0]}


def test_folder_round_trip_and_bad_lines_counted(tmp_path):
    folder = write_task_folder(tmp_path / "t", "vqa", "train", [_vqa(0), _vqa(1)], labels=["a", "b", "c"])
    with open(folder / EXAMPLES, "ab") as f:
        f.write(b"not json\n")
        f.write(b"\xff\xfe\n")  # not UTF-8
        f.write(json.dumps({**_vqa(2), "labels": [7]}).encode() + b"\n")  # label outside the vocabulary
        f.write(json.dumps({**_vqa(3), "text": "bad\x00text"}).encode() + b"\n")
        f.write(json.dumps({"id": "q9", "image_id": "x"}).encode() + b"\n")  # no text
        f.write(b"[1, 2]\n")
        f.write(b"{\"id\": \"" + b"x" * (2 << 20) + b"\"}\n")  # over MAX_LINE_BYTES
        f.write(json.dumps({**_vqa(4), "id": 5}).encode() + b"\n")  # id not a string
        f.write(json.dumps({**_vqa(5), "weights": [0.5, 0.5]}).encode() + b"\n")  # a weight per label, or none
        f.write(json.dumps({**_vqa(6), "weights": [1.5]}).encode() + b"\n")  # a share of annotators: <= 1
        f.write(json.dumps({**_vqa(7), "weights": [0.3]}).encode() + b"\n")
    read = read_task_folder(folder, task="vqa")
    assert [r["id"] for r in read.examples] == ["q0", "q1", "q7"] and read.labels == ["a", "b", "c"]
    assert read.skipped == {"bad_json": 3, "bad_label": 2, "bad_caption": 1, "missing_field": 1,
                            "line_too_long": 1, "bad_field": 2}
    assert read.seen == 13


@pytest.mark.parametrize("manifest, message", [
    ({"format": "vlpt-regions-v1"}, "expected 'vlpt-task-v1'"),
    ({"format": "vlpt-task-v1", "task": "gqa"}, "names task 'gqa'"),
    ({"format": "vlpt-task-v1", "task": "vqa", "labels": [1, 2]}, "list of strings"),
    ([1, 2], "expected 'vlpt-task-v1'"),
])
def test_bad_manifests_are_refused_with_one_line(tmp_path, manifest, message):
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / EXAMPLES).write_text("")
    with pytest.raises(ValueError, match=message):
        read_task_folder(tmp_path, "finetune.train")


def test_wrong_task_and_missing_manifest(tmp_path):
    write_task_folder(tmp_path / "t", "ve", "train", [])
    with pytest.raises(ValueError, match="holds 've' examples but the run fine-tunes 'vqa'"):
        read_task_folder(tmp_path / "t", task="vqa")
    with pytest.raises(ValueError, match="no manifest.json"):
        read_task_folder(tmp_path / "nothing")


def test_examples_symlink_is_refused(tmp_path):
    folder = write_task_folder(tmp_path / "t", "ve", "train", [])
    os.remove(folder / EXAMPLES)
    os.symlink("/etc/passwd", folder / EXAMPLES)
    with pytest.raises(ValueError, match="not a regular file"):
        read_task_folder(folder)


def test_feature_store_indexes_once_and_counts_bad(demo_data, tmp_path):
    store = FeatureStore([str(demo_data / "train"), str(demo_data / "val")], img_dim=16, cache_images=4)
    assert len(store) == 240 + 40  # each scene once, though its shards hold it once per caption
    regions, reason = store.get("val-scene-000003")
    assert reason is None and regions.img_feat.shape[1] == 16 and regions.img_pos.shape == (regions.num_bb, 7)
    assert np.allclose(regions.img_pos[:, 6], regions.img_pos[:, 4] * regions.img_pos[:, 5])
    assert store.get("no-such-image") == (None, "unknown_image")
    with pytest.raises(ValueError, match="16-d region features but model.img_dim=8"):
        FeatureStore([str(demo_data / "train")], img_dim=8)
    with pytest.raises(ValueError, match="copy the region shards to a local folder"):
        FeatureStore(["s3://bucket/features"], img_dim=16)


def test_feature_store_survives_damaged_members(demo_data, tmp_path):
    """A shard whose npz is not an npz, plus a symlink member: the image is counted bad, the link never followed."""
    import shutil

    root = tmp_path / "regions"
    shutil.copytree(demo_data / "val", root)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / manifest["shards"][0]["path"] if isinstance(manifest["shards"][0], dict) else None
    shard = shard or root / manifest["shards"][0]
    with tarfile.open(shard, "r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[1][0].name.split(".")[0]
    with tarfile.open(shard, "w:") as tar:
        for m, data in members:
            if m.name.startswith(bad_key) and m.name.endswith(".npz"):
                data = b"PK\x03\x04 not a zip"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
        link = tarfile.TarInfo("evil.npz")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    manifest_text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(manifest_text)
    store = FeatureStore([str(root)], img_dim=16, allow_outside=False)
    bad_image = json.loads([d for m, d in members if m.name == f"{bad_key}.json"][0])["image_id"]
    regions, reason = store.get(bad_image)
    assert regions is None and reason == "bad_npz"
    assert store.get(bad_image) == (None, "bad_npz")  # remembered, not decoded again


def _loader(items, store, streams, n_streams=2, micro=3, steps=0):
    def collate(samples, rng):
        return {"ids": [r["id"] for r, _ in samples], "draw": float(rng.random())}
    return DownstreamLoader(items, store, collate, key="vqa", seed=5, n_streams=n_streams, micro_batch=micro,
                            streams=streams, steps_done=steps)


@pytest.fixture()
def store(demo_data):
    return FeatureStore([str(demo_data / "train")], img_dim=16)


def test_loader_is_world_size_invariant_and_resumes(store):
    items = [_vqa(i, f"train-scene-{i:06d}") for i in range(20)]
    one = _loader(items, store, [0, 1])  # one process, accumulation 2
    two = [_loader(items, store, [0]), _loader(items, store, [1])]  # two processes
    for _ in range(7):  # over an epoch boundary (3 steps per epoch)
        assert one.next() == two[0].next()
        assert one.next() == two[1].next()
    state = one.state_dict()
    assert state["steps"] == {"0": 7, "1": 7}
    resumed = _loader(items, store, [0, 1], steps=steps_from_state(state, "vqa", 2, [0, 1]))
    assert resumed.next() == one.next() and resumed.next() == one.next()
    with pytest.raises(ValueError, match="taken with 2 streams, this run has 4"):
        steps_from_state(state, "vqa", 4, [0])


def test_loader_drops_and_counts_bad_examples(store):
    items = [_vqa(i, f"train-scene-{i:06d}") for i in range(6)] + [_vqa(99, "missing-scene")]
    skipped: dict[str, int] = {}
    kept = known_images(items, store, skipped)
    assert len(kept) == 6 and skipped == {"unknown_image": 1}
    re_items = [{"id": "r0", "image_id": "train-scene-000000", "text": "the cube", "target": 999,
                 "box": [0, 0, 1, 1]}] + [{"id": f"r{i}", "image_id": f"train-scene-{i:06d}", "text": "x",
                                           "target": 0, "box": [0, 0, 1, 1]} for i in range(1, 4)]
    loader = _loader(re_items, store, [0], n_streams=1, micro=2)
    seen = [loader.next()["ids"] for _ in range(2)]
    assert sum(len(b) for b in seen) == 3 and loader.skip_counts == {"bad_label": 1}
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        _loader(kept[:3], store, [0], n_streams=2, micro=2)
    hopeless = _loader([{**re_items[0], "id": f"x{i}"} for i in range(4)], store, [0], n_streams=1, micro=2)
    with pytest.raises(NoUsableData, match="none of the 4 examples"):
        hopeless.next()
