"""`vlpt tasks ...`: official-format files -> task folders (data/tasks/official*.py), read back with the
run's reader; VQA soft scores and vocabulary, NLVR2 image ids, VE labels, RefCOCO targets, the
restricted unpickler."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest

from data.tasks.folder import read_task_folder, read_task_manifest
from data.tasks.official import (build_karpathy, build_nlvr2, build_ve, build_vqa, check_id_format,
                                 normalize_answer, nlvr2_image_ids, vqa_score, vqa_targets)
from data.tasks.official_cli import add_task_builder_commands, run_task_builder
from data.tasks.official_refcoco import build_refcoco
from data.tasks.official_vcr import build_vcr, vcr_text
from data.tasks.safe_pickle import load_restricted, loads_restricted


def _json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def _jsonl(path: Path, lines: list) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def _read(folder, task: str) -> list[dict]:
    f = read_task_folder(folder, task=task)
    assert f.skipped == {}, "a builder must never write a line the reader skips"
    return f.examples


# ---------------------------------------------------------------- VQA

def test_vqa_score_table_and_leave_one_out():
    assert [vqa_score(m) for m in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    answers = ["2"] * 3 + ["3"] * 2 + ["4"] + ["5"] * 4  # brute force: every leave-one-out subset
    for a, score in vqa_targets(answers).items():
        subsets = [answers[:i] + answers[i + 1:] for i in range(len(answers))]
        expected = sum(min(s.count(a) / 3, 1) for s in subsets) / len(subsets)
        assert score == pytest.approx(expected, abs=1e-6)
    assert vqa_targets(answers) == {"2": 0.9, "3": 0.6, "4": 0.3, "5": 1.0}


@pytest.mark.parametrize("raw, norm", [("Two", "2"), ("Yes.", "yes"), ("the yes", "yes"), ("A Dog!", "dog"),
                                       ("dont know", "don't know"), ("2.5", "2.5"), ("1,000", "1000"),
                                       ("black/white", "black white"), ("  Red ", "red"), ("none", "0")])
def test_vqa_answer_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def _answers(*groups: tuple[str, int]) -> list[dict]:
    out = [{"answer": a, "answer_confidence": "yes"} for a, n in groups for _ in range(n)]
    assert len(out) == 10
    return [dict(a, answer_id=i + 1) for i, a in enumerate(out)]


def _ann(qid, image, mc, answers):
    return {"question_id": qid, "image_id": image, "multiple_choice_answer": mc, "answers": answers}


@pytest.fixture
def vqa(tmp_path) -> dict:
    q = lambda qid, image, text: {"question_id": qid, "image_id": image, "question": text}  # noqa: E731
    train_q = [q(1, 9, "How many dogs?"), q(2, 9, "Is it sunny?"), q(3, 10, "What number is on the bus?"),
               q(4, 12, "Is the dog asleep?"), q(5, 10, "Is this the sea?"), q(6, 11, "What color?"),
               q(7, 12, "Annotation broken?"), {"question_id": 8, "image_id": 12}, q(9, 12, "   "),
               "not a question", q(1, 9, "Duplicate?"), q(10, "abc", "Bad image id?")]
    train_a = [_ann(1, 9, "Two", _answers(("two", 4), ("2", 3), ("3", 2), ("three", 1))),
               _ann(2, 9, "yes", _answers(("yes", 2), ("no", 1), ("maybe", 7))),
               _ann(3, 10, "2", _answers(("2", 10))),
               _ann(4, 12, "no", _answers(("no", 4), ("yes", 6))),
               _ann(5, 10, "Yes.", _answers(("Yes.", 1), ("yes!", 1), ("the yes", 1), ("no way", 7))),
               _ann(6, 11, "red", _answers(("red", 10))),
               _ann(7, 12, "no", "oops")]
    return {"questions": {"train": _json(tmp_path / "train_q.json", {"questions": train_q}),
                          "val": _json(tmp_path / "val_q.json", {"questions": [q(100, 13, "Any cats?")]}),
                          "test": _json(tmp_path / "test_q.json", {"questions": [q(200, 14, "Where?")]})},
            "annotations": {"train": _json(tmp_path / "train_a.json", {"annotations": train_a}),
                            "val": _json(tmp_path / "val_a.json", {"annotations": [
                                _ann(100, 13, "no", _answers(("yes", 1), ("no", 9)))]})}}


def test_vqa_round_trip_vocabulary_and_scores(vqa, tmp_path):
    out = tmp_path / "vqa"
    s = build_vqa(vqa["questions"], out, vqa["annotations"], num_answers=3, image_id_format="COCO_{:012d}")
    # "2" and "yes" twice each (normalised: "Two", "Yes."); "no" and "red" once: the tie goes to "no";
    # the bad annotation's "no" does not count. weights: ALBEF's share of the 10 annotators per kept answer
    labels = ["2", "yes", "no"]
    assert read_task_manifest(out / "train")["labels"] == labels and s["num_answers"] == 3
    img = lambda i: f"COCO_{i:012d}"  # noqa: E731
    assert _read(out / "train", "vqa") == [
        {"id": "1", "image_id": img(9), "text": "How many dogs?", "labels": [0], "scores": [1.0],
         "weights": [0.7]},
        {"id": "2", "image_id": img(9), "text": "Is it sunny?", "labels": [1, 2], "scores": [0.6, 0.3],
         "weights": [0.2, 0.1]},
        {"id": "3", "image_id": img(10), "text": "What number is on the bus?", "labels": [0], "scores": [1.0],
         "weights": [1.0]},
        {"id": "4", "image_id": img(12), "text": "Is the dog asleep?", "labels": [1, 2], "scores": [1.0, 1.0],
         "weights": [0.6, 0.4]},
        {"id": "5", "image_id": img(10), "text": "Is this the sea?", "labels": [1], "scores": [0.9], "weights": [0.3]},
        {"id": "6", "image_id": img(11), "text": "What color?", "labels": [], "scores": [], "weights": []}]
    assert _read(out / "val", "vqa") == [
        {"id": "100", "image_id": img(13), "text": "Any cats?", "labels": [1, 2], "scores": [0.3, 1.0],
         "weights": [0.1, 0.9]}]
    assert _read(out / "test", "vqa") == [{"id": "200", "image_id": img(14), "text": "Where?"}]
    assert s["skipped"] == {"bad_field": 2, "bad_record": 1, "duplicate_id": 1, "empty_caption": 1,
                            "missing_field": 1, "no_annotation": 1}
    assert s["written"] == {"train": 6, "val": 1, "test": 1} and s["unlabelled"] == 1


def test_vqa_ans2label_and_user_errors(vqa, tmp_path):
    a2l = _json(tmp_path / "a2l.json", {"yes": 0, "no": 1})
    build_vqa({"val": vqa["questions"]["val"]}, tmp_path / "o", {"val": vqa["annotations"]["val"]}, ans2label=a2l)
    assert read_task_manifest(tmp_path / "o" / "val")["labels"] == ["yes", "no"]
    assert _read(tmp_path / "o" / "val", "vqa")[0]["labels"] == [0, 1]
    with pytest.raises(ValueError, match="indices must be"):
        build_vqa(vqa["questions"], tmp_path / "o", ans2label=_json(tmp_path / "bad.json", {"a": 0, "b": 2}))
    with pytest.raises(ValueError, match="pass --annotations train=FILE"):
        build_vqa({"test": vqa["questions"]["test"]}, tmp_path / "o")
    with pytest.raises(ValueError, match="nowhere.json"):
        build_vqa({"train": str(tmp_path / "nowhere.json")}, tmp_path / "o", vqa["annotations"])
    with pytest.raises(ValueError, match="split name"):
        build_vqa({"../up": vqa["questions"]["val"]}, tmp_path / "o", vqa["annotations"])
    with pytest.raises(ValueError, match="one plain field"):
        check_id_format("{0.__class__}")


# ---------------------------------------------------------------- NLVR2, VE

def test_nlvr2_image_ids():
    assert nlvr2_image_ids("dev-850-0-0") == ["dev-850-0-img0", "dev-850-0-img1"]
    assert nlvr2_image_ids("train-10171-0-3") == ["train-10171-0-img0", "train-10171-0-img1"]
    assert nlvr2_image_ids("nodash") is None


def test_nlvr2_round_trip(tmp_path):
    dev = _jsonl(tmp_path / "dev.json", [
        {"identifier": "dev-850-0-0", "sentence": "There are two dogs.", "label": "True", "left_url": "x"},
        {"identifier": "dev-850-0-1", "sentence": "One dog.", "label": "False"},
        {"identifier": "nodash", "sentence": "x", "label": "True"},
        {"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"},
        "{not json", "", {"sentence": "no id", "label": "True"}, [1, 2]])
    test = _jsonl(tmp_path / "test.json", [{"identifier": "test1-0-1-2", "sentence": "A cat."}])
    s = build_nlvr2({"dev": dev, "test1": test}, tmp_path / "out")
    assert _read(tmp_path / "out" / "dev", "nlvr2") == [
        {"id": "dev-850-0-0", "image_ids": ["dev-850-0-img0", "dev-850-0-img1"], "text": "There are two dogs.",
         "label": 1},
        {"id": "dev-850-0-1", "image_ids": ["dev-850-0-img0", "dev-850-0-img1"], "text": "One dog.", "label": 0}]
    assert _read(tmp_path / "out" / "test1", "nlvr2") == [
        {"id": "test1-0-1-2", "image_ids": ["test1-0-1-img0", "test1-0-1-img1"], "text": "A cat."}]
    assert s["skipped"] == {"bad_field": 1, "bad_json": 1, "bad_label": 1, "bad_record": 1, "missing_field": 1}
    assert s["written"] == {"dev": 2, "test1": 1}


def test_ve_label_mapping_round_trip(tmp_path):
    line = lambda pair, label, text="A man.", image="123.jpg": {  # noqa: E731
        "Flikr30kID": image, "sentence2": text, "gold_label": label, "pairID": pair, "sentence1": "ignored"}
    path = _jsonl(tmp_path / "ve.jsonl", [
        line("p1", "contradiction"), line("p2", "entailment", image="456.jpg"), line("p3", "neutral"),
        line("p4", "-"), {"Flikr30kID": "1.jpg", "gold_label": "neutral", "pairID": "p5"},
        line("p6", "neutral", text="bad \u0001 text"), line("p1", "neutral")])
    s = build_ve({"train": path}, tmp_path / "out")
    assert _read(tmp_path / "out" / "train", "ve") == [
        {"id": "p1", "image_id": "123", "text": "A man.", "label": 0},
        {"id": "p2", "image_id": "456", "text": "A man.", "label": 1},
        {"id": "p3", "image_id": "123", "text": "A man.", "label": 2}]
    assert s["skipped"] == {"bad_label": 1, "bad_caption": 1, "duplicate_id": 1, "missing_field": 1}


# ---------------------------------------------------------------- RefCOCO

INSTANCES = {"images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 100, "height": 50}],
             "annotations": [{"id": 11, "image_id": 1, "bbox": [0, 0, 5, 5]},
                             {"id": 21, "image_id": 2, "bbox": [1, 1, 2, 2]},
                             {"id": 12, "image_id": 1, "bbox": [10.5, 20, 30, 40]},
                             {"id": 13, "image_id": 1, "bbox": [1, 2, 3, 4]},
                             {"id": 22, "image_id": 2, "bbox": [5, 6, 7, 8]},
                             {"id": 99}]}
REFS = [
    {"ref_id": 0, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 1,
     "sentences": [{"sent": "man on left", "sent_id": 0, "tokens": ["man"]}, {"sent": "guy in red", "sent_id": 1}]},
    {"ref_id": 1, "ann_id": 22, "image_id": 2, "split": "testA", "sentences": [{"sent": "the car", "sent_id": 2}]},
    {"ref_id": 2, "ann_id": 13, "image_id": 1, "split": "val", "sentences": [{"sent": "", "sent_id": 3},
                                                                             {"sent_id": 4}]},
    {"ref_id": 3, "ann_id": 777, "image_id": 1, "split": "train", "sentences": [{"sent": "x", "sent_id": 5}]},
    {"ref_id": 4, "ann_id": 11, "image_id": 1, "split": "../../evil", "sentences": [{"sent": "x", "sent_id": 6}]},
    {"ref_id": 5, "ann_id": 11, "image_id": 2, "split": "train", "sentences": [{"sent": "x", "sent_id": 7}]},
]
REF_EXPECTED = {
    "train": [{"id": "0", "image_id": "1", "text": "man on left", "target": 1, "box": [10.5, 20.0, 30.0, 40.0],
               "width": 640, "height": 480},
              {"id": "1", "image_id": "1", "text": "guy in red", "target": 1, "box": [10.5, 20.0, 30.0, 40.0],
               "width": 640, "height": 480}],
    "testA": [{"id": "2", "image_id": "2", "text": "the car", "target": 1, "box": [5.0, 6.0, 7.0, 8.0],
               "width": 100, "height": 50}],
}
REF_SKIPPED = {"bad_annotation": 1, "bad_split": 1, "empty_caption": 1, "image_mismatch": 1, "missing_field": 1,
               "unknown_annotation": 1}


@pytest.mark.parametrize("form", ["json", "pickle-0", "pickle-2", "pickle-5"])
def test_refcoco_round_trip_target_from_annotation_order(tmp_path, form):
    if form == "json":
        refs = _json(tmp_path / "refs.json", REFS)
    else:
        refs = tmp_path / "refs(unc).p"
        refs.write_bytes(pickle.dumps(REFS, protocol=int(form[-1])))
    s = build_refcoco(refs, _json(tmp_path / "instances.json", INSTANCES), tmp_path / "out")
    # ann 12 is the second annotation of image 1 in file order (11, 12, 13); ann 22 the second of image 2
    assert {split: _read(tmp_path / "out" / split, "re") for split in s["written"]} == REF_EXPECTED
    assert s["skipped"] == REF_SKIPPED
    assert not (tmp_path / "evil").exists() and sorted(os.listdir(tmp_path / "out")) == ["testA", "train"]


def test_refcoco_split_filter(tmp_path):
    s = build_refcoco(_json(tmp_path / "refs.json", REFS), _json(tmp_path / "inst.json", INSTANCES),
                      tmp_path / "out", splits=["testA"], image_id_format="COCO_train2014_{:012d}")
    assert s["written"] == {"testA": 1}
    assert _read(tmp_path / "out" / "testA", "re")[0]["image_id"] == "COCO_train2014_000000000002"


def test_refcoco_detections_become_candidate_boxes(tmp_path):
    dets = {"1": [[0, 0, 10, 10, 0.9], [5, 5, 20, 30]], "2": [[1, 2, 0, 4], "x", [1, 2, 3]] + [[0, 0, 1, 1]] * 101,
            "9": [[0, 0, 1, 1]]}
    s = build_refcoco(_json(tmp_path / "refs.json", REFS), _json(tmp_path / "inst.json", INSTANCES),
                      tmp_path / "out", detections=_json(tmp_path / "dets.json", dets))
    train, test = _read(tmp_path / "out" / "train", "re"), _read(tmp_path / "out" / "testA", "re")
    assert [r["boxes"] for r in train] == [[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]]] * 2  # score dropped
    assert test[0]["boxes"] == [[0.0, 0.0, 1.0, 1.0]] * 100  # the zero-width, bad and short ones out; capped
    assert s["skipped"] == {**REF_SKIPPED, "bad_detection": 3}
    with pytest.raises(ValueError, match="expected a JSON object"):
        build_refcoco(_json(tmp_path / "refs.json", REFS), _json(tmp_path / "inst.json", INSTANCES),
                      tmp_path / "o2", detections=_json(tmp_path / "bad.json", [[0, 0, 1, 1]]))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_globals_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _Evil(marker)}], protocol=2))
    with pytest.raises(ValueError, match=r"refused: the pickle asks for the global (posix|os|nt)\.system"):
        build_refcoco(refs, _json(tmp_path / "inst.json", INSTANCES), tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    for payload in (pickle.dumps(eval), pickle.dumps(_Evil(marker), protocol=0), pickle.dumps(set, protocol=4)):
        with pytest.raises(ValueError, match="refused"):
            loads_restricted(payload)
    assert not marker.exists()


def test_restricted_unpickler_loads_plain_data(tmp_path):
    plain = {"a": [1, 2.5, None, True], "b": (1, "é"), "e": {"n": -(10 ** 30)}}
    full = dict(plain, c={1, 2}, d=frozenset({3}), f=b"x")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # before 4, sets and bytes need a global: refused
        value = full if protocol >= 4 else plain
        assert loads_restricted(pickle.dumps(value, protocol=protocol)) == value
    (tmp_path / "big.p").write_bytes(b"\x80\x02" + b"N" * 100 + b".")
    with pytest.raises(ValueError, match="over the 50-byte limit"):
        load_restricted(tmp_path / "big.p", max_bytes=50)
    with pytest.raises(ValueError, match="not a readable pickle"):
        loads_restricted(b"\x80\x02]q\x00(K\x01")  # truncated


# ---------------------------------------------------------------- Karpathy

def test_karpathy_round_trip_and_restval(tmp_path):
    images = [
        {"filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895, "split": "test",
         "sentences": [{"raw": "A man rides.", "sentid": 770337, "tokens": ["a"]}, {"raw": "", "sentid": 1}]},
        {"filename": "a.jpg", "cocoid": 5, "split": "restval", "sentences": [{"raw": "Cat.", "sentid": 2}]},
        {"filename": "b.jpg", "cocoid": 6, "split": "train",
         "sentences": [{"raw": "Dog.", "sentid": 3}, {"raw": "Dup.", "sentid": 3}]},
        {"filename": "c.jpg", "cocoid": 7, "split": "weird", "sentences": [{"raw": "x", "sentid": 4}]},
        {"filename": "d.jpg", "cocoid": 8, "split": "val", "sentences": "nope"}, "junk",
        {"filename": "1000092795.jpg", "imgid": 0, "split": "val", "sentences": [{"raw": "Two men.", "sentid": 9}]},
    ]
    path = _json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    s = build_karpathy(path, tmp_path / "out")
    assert _read(tmp_path / "out" / "train", "retrieval") == [
        {"id": "2", "image_id": "5", "text": "Cat."}, {"id": "3", "image_id": "6", "text": "Dog."}]
    assert _read(tmp_path / "out" / "test", "retrieval") == [
        {"id": "770337", "image_id": "391895", "text": "A man rides."}]
    assert _read(tmp_path / "out" / "val", "retrieval") == [
        {"id": "9", "image_id": "1000092795", "text": "Two men."}]
    assert s["skipped"] == {"bad_field": 1, "bad_record": 1, "bad_split": 1, "duplicate_id": 1, "empty_caption": 1}
    s = build_karpathy(path, tmp_path / "own", restval_into_train=False)
    assert s["written"] == {"test": 1, "restval": 1, "train": 1, "val": 1}


# ---------------------------------------------------------------- VCR

OBJECTS = ["person", "person", "car"]


def _vcr(annot_id, **kw) -> dict:
    r = {"annot_id": annot_id, "img_id": "val-0", "img_fn": "lsmdc_x/y.jpg", "objects": OBJECTS,
         "question": ["What", "is", [0], "doing", "?"],
         "answer_choices": [[[0, 1], "are", "talking", "."], ["Nothing", "."], [[2], "moves", "."], ["He", "sleeps"]],
         "rationale_choices": [["A"], ["B"], [[0, 1, 2], "are", "there"], ["D"]],
         "answer_label": 0, "rationale_label": 2}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def test_vcr_object_references():
    assert vcr_text(["What", "is", [0], "doing", "?"], OBJECTS) == "What is person1 doing ?"
    assert vcr_text([[0, 1], "talk"], OBJECTS) == "person1 and person2 talk"
    assert vcr_text([[0, 1, 2]], OBJECTS) == "person1, person2 and car3"
    assert vcr_text([[3]], OBJECTS) is None and vcr_text([[True]], OBJECTS) is None


def test_vcr_round_trip(tmp_path):
    val = _jsonl(tmp_path / "val.jsonl", [
        _vcr("val-0"), _vcr("val-1", question=["Who", [5], "?"]), _vcr("val-2", answer_choices=[["a"], ["b"], ["c"]]),
        _vcr("val-3", answer_label=7), _vcr(None), "x" * 10])
    test = _jsonl(tmp_path / "test.jsonl", [_vcr("test-0", img_id=None, img_fn="lsmdc_x/z.jpg", answer_label=None,
                                                 rationale_label=None)])
    s = build_vcr({"val": val, "test": test}, tmp_path / "out")
    answers = ["person1 and person2 are talking .", "Nothing .", "car3 moves .", "He sleeps"]
    rationales = ["A", "B", "person1, person2 and car3 are there", "D"]
    assert _read(tmp_path / "out" / "val", "vcr") == [
        {"id": "val-0", "image_id": "val-0", "question": "What is person1 doing ?", "answers": answers,
         "rationales": rationales, "answer_label": 0, "rationale_label": 2}]
    assert _read(tmp_path / "out" / "test", "vcr") == [
        {"id": "test-0", "image_id": "lsmdc_x/z", "question": "What is person1 doing ?", "answers": answers,
         "rationales": rationales}]
    assert s["skipped"] == {"bad_field": 2, "bad_json": 1, "bad_label": 1, "missing_field": 1}


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpt")
    add_task_builder_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_runs_each_kind(vqa, tmp_path, capsys):
    nlvr = _jsonl(tmp_path / "n.jsonl", [{"identifier": "dev-1-0-0", "sentence": "S.", "label": "True"}])
    ve = _jsonl(tmp_path / "ve.jsonl", [{"Flikr30kID": "1.jpg", "sentence2": "S.", "gold_label": "neutral",
                                         "pairID": "p"}])
    vcr = _jsonl(tmp_path / "vcr.jsonl", [_vcr("v-0")])
    kar = _json(tmp_path / "k.json", {"images": [{"filename": "a.jpg", "cocoid": 1, "split": "restval",
                                                  "sentences": [{"raw": "S.", "sentid": 1}]}]})
    refs, inst = _json(tmp_path / "refs.json", REFS), _json(tmp_path / "inst.json", INSTANCES)
    q, a = vqa["questions"], vqa["annotations"]
    runs = {"vqa": ["--questions", f"train={q['train']}", f"test={q['test']}", "--annotations", f"train={a['train']}",
                    "--num-answers", "3", "--image-id-format", "COCO_{:012d}"],
            "nlvr2": ["--jsonl", f"dev={nlvr}"], "ve": ["--jsonl", f"test={ve}"], "vcr": ["--jsonl", f"val={vcr}"],
            "karpathy": ["--karpathy", kar, "--no-restval-into-train"],
            "refcoco": ["--refs", refs, "--instances", inst, "--splits", "train,testA"]}
    for kind, argv in runs.items():
        args = _parser().parse_args(["tasks", kind, *argv, "--out", str(tmp_path / kind)])
        assert args.fn(args, []) == 0
        summary = json.loads(capsys.readouterr().out.strip())  # one JSON line
        assert summary["task"] == {"karpathy": "retrieval", "refcoco": "re"}.get(kind, kind) and summary["total"] > 0
    assert summary["written"] == {"train": 2, "testA": 1}
    args = _parser().parse_args(["tasks", "nlvr2", "--jsonl", f"dev={tmp_path / 'gone.jsonl'}", "--out", "o"])
    assert run_task_builder(args) == 2
    assert "gone.jsonl" in capsys.readouterr().err
    args = _parser().parse_args(["tasks", "ve", "--jsonl", f"../x={ve}", "--out", "o"])
    assert run_task_builder(args) == 2 and "SPLIT=FILE" in capsys.readouterr().err


def test_rebuild_in_place_is_byte_identical(vqa, tmp_path):
    first = build_vqa(vqa["questions"], tmp_path / "out", vqa["annotations"], num_answers=3)
    files = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert build_vqa(vqa["questions"], tmp_path / "out", vqa["annotations"], num_answers=3) == first
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()} == files


def test_vqa_punctuation_judged_on_the_answer_as_given():
    # "-" touches no space in the answer as given, so both are spaced (the "/" turned into a space first
    # must not change that)
    assert normalize_answer("x/-y c-d") == "x y c d"


def test_refcoco_hostile_values_are_counted(tmp_path):
    huge_box = {"id": 14, "image_id": 1, "bbox": [10 ** 400, 0, 1, 1]}  # beyond float: bad_field
    inst = dict(INSTANCES, annotations=INSTANCES["annotations"] + [huge_box])
    # an ann_id of 5,000 digits (no str() of it); one shared sentence list over the per-ref cap
    refs = [dict(REFS[0], ann_id=14), dict(REFS[1], ann_id=10 ** 5000), dict(REFS[1], sentences=[{"sent": "x"}] * 101)]
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    s = build_refcoco(path, _json(tmp_path / "inst.json", inst), tmp_path / "out")
    assert s["total"] == 0 and s["skipped"] == {"bad_annotation": 1, "bad_field": 2, "unknown_annotation": 1}
