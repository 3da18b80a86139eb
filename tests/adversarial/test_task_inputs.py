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
from data.tasks.folder import EXAMPLES, read_task_folder, write_task_folder
from data.tasks.official_refcoco import read_detections
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


HUGE = "1" + "0" * 400  # a JSON int beyond float's range: math.isfinite raises on it


def test_hostile_candidate_boxes_and_answer_weights_are_counted_never_raised(tmp_path):
    """Records' `boxes` (grounding) and `weights` (VQA) as a hostile file may write them: NaN and Infinity
    literals, ints beyond float's range, bools, strings, nesting, too many boxes. Each record is skipped and
    counted; the good one is kept."""
    re_ok = {"id": "ok", "image_id": "i", "text": "the ball", "target": 0, "box": [0, 0, 1, 1],
             "width": 10, "height": 10, "boxes": [[0, 0, 1, 1], [2, 2, 3, 3]]}
    folder = write_task_folder(tmp_path / "re", "re", "train", [re_ok])
    bad_boxes = ["[[0, 0, 1, NaN]]", "[[0, 0, Infinity, 1]]", f"[[0, 0, 1, {HUGE}]]", "[[0, 0, true, 1]]",
                 '[["0", 0, 1, 1]]', "[[[0, 0, 1, 1]]]", "[[0, 0, 1]]", "[[0, 0, 0, 1]]", "[]", '"all"',
                 json.dumps([[0, 0, 1, 1]] * 101)]
    without_boxes = {k: v for k, v in re_ok.items() if k != "boxes"}
    with open(folder / EXAMPLES, "a") as f:
        for k, boxes in enumerate(bad_boxes):  # written as text: the values are not all valid JSON for json.dumps
            f.write(json.dumps({**without_boxes, "id": f"b{k}"})[:-1] + f', "boxes": {boxes}}}\n')
        f.write(json.dumps({**without_boxes, "id": "big"}).replace("[0, 0, 1, 1]", f"[0, 0, 1, {HUGE}]") + "\n")
    read = read_task_folder(folder, task="re")
    assert [r["id"] for r in read.examples] == ["ok"] and read.skipped == {"bad_field": len(bad_boxes) + 1}

    vqa_ok = {"id": "ok", "image_id": "i", "text": "what colour?", "labels": [0, 1], "scores": [1.0, 0.3],
              "weights": [0.7, 0.3]}
    folder = write_task_folder(tmp_path / "vqa", "vqa", "train", [vqa_ok], labels=["red", "blue"])
    bad_weights = ["[NaN, 0.3]", "[Infinity, 0.3]", f"[{HUGE}, 0.3]", "[-0.5, 0.3]", "[true, 0.3]", '["0.7", 0.3]',
                   "[[0.7], 0.3]", "[0.7]", "{}"]
    with open(folder / EXAMPLES, "a") as f:
        for k, weights in enumerate(bad_weights):
            f.write(json.dumps({**vqa_ok, "id": f"w{k}"}).replace("[0.7, 0.3]", weights) + "\n")
        f.write(json.dumps({**vqa_ok, "id": "s"}).replace("[1.0, 0.3]", f"[{HUGE}, 0.3]") + "\n")
    read = read_task_folder(folder, task="vqa")
    assert [r["id"] for r in read.examples] == ["ok"]
    assert sum(read.skipped.values()) == len(bad_weights) + 1 and set(read.skipped) <= {"bad_field", "bad_label"}


def test_hostile_detections_files_are_counted_or_refused_in_one_line(tmp_path, capsys):
    """ALBEF's detections file through `vlpt tasks refcoco --detections`: bad detections are counted, a file that
    is not a JSON object, nests without end or is a FIFO is refused before anything is written."""
    text = ('{"1": [[0, 0, 2, 3, 0.9], [0, 0, NaN, 1], [0, 0, Infinity, 1], [0, 0, ' + HUGE + ', 1], '
            '[true, 0, 1, 1], ["0", 0, 1, 1], [0, 0, -1, 1], [[0, 0, 1, 1]], "box", null, {"x": 1}], '
            '"2": {"x": 1}, "3": []}')
    path = tmp_path / "dets.json"
    path.write_text(text)
    skipped: Counter = Counter()
    assert read_detections(path, skipped) == {"1": [[0.0, 0.0, 2.0, 3.0]]}
    assert skipped == {"bad_detection": 11}

    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([]))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": []}))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    for bad, message in ((deep, "not readable JSON"), (fifo, "not a regular file"), (refs, "expected a JSON object")):
        code = main(["tasks", "refcoco", "--refs", str(refs), "--instances", str(instances),
                     "--detections", str(bad), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
