"""Demo downstream tasks (data/tasks/demo.py): folders, ids, images, balance, and every label recomputed
from the scene model (docs/downstream.md, "Task folders")."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from data.demo import write_demo_dataset
from data.demo_scenes import DEMO_COLOURS, DEMO_SHAPES, generate_scenes, spatial_relation
from data.tasks.demo import MAX_TWIN_IOU, VQA_ANSWERS, box_iou, pick_expression, re_examples, write_demo_tasks
from data.tasks.folder import EXAMPLES, MANIFEST, read_task_folder
from data.tasks.records import NUM_CHOICES, TASKS

SMALL = dict(seed=5, n_train_scenes=80, n_val_scenes=30, img_dim=16, noise_std=0.5)
SPLIT_SCENES = {"train": SMALL["n_train_scenes"], "val": SMALL["n_val_scenes"]}
COLOUR = "|".join(DEMO_COLOURS)
SHAPE = "|".join(DEMO_SHAPES)
REL = "left of|right of|above|below|next to"
NP = rf"an? (?:{COLOUR}) (?:{SHAPE})"
NUMBERS = ("one", "two", "three", "four")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("tasks_a"), tmp_path_factory.mktemp("tasks_b")
    summary = write_demo_tasks(a, region_dirs=None, **SMALL)
    write_demo_tasks(b, region_dirs=None, **SMALL)
    folders = {(t, s): read_task_folder(a / t / s, task=t) for t in TASKS for s in SPLIT_SCENES}
    return summary, a, b, folders


@pytest.fixture(scope="module")
def scenes():
    args = {k: SMALL[k] for k in ("seed", "img_dim", "noise_std")}
    return {split: {s.image_id: s for s in generate_scenes(split, n, **args)} for split, n in SPLIT_SCENES.items()}


# ------------------------------------------------------------ an independent reading of a scene

class View:
    """A scene's objects as the test reads them: (shape, colour) -> (confident region, twin)."""

    def __init__(self, scene):
        self.scene = scene
        regions = defaultdict(list)
        for i, o in enumerate(scene.objects):
            if o is not None:
                regions[tuple(o)].append(i)
        assert all(len(r) == 2 for r in regions.values())
        self.regions = {k: tuple(sorted(r, key=lambda i: -scene.conf[i])) for k, r in regions.items()}

    def find(self, phrase: str) -> tuple[int, int] | None:
        """(shape, colour) of 'a red cube' / 'red cube' if in view, else None."""
        colour, shape = phrase.split()[-2:]
        key = (DEMO_SHAPES.index(shape), DEMO_COLOURS.index(colour))
        return key if key in self.regions else None

    def rel(self, a: tuple[int, int], b: tuple[int, int]) -> str:
        return spatial_relation(self.scene.norm_bb[self.regions[a][0]], self.scene.norm_bb[self.regions[b][0]])

    def count(self, colour: str | None = None) -> int:
        return sum(colour is None or DEMO_COLOURS[c] == colour for _, c in self.regions)


# ------------------------------------------------------------ folders, ids, images

def test_every_task_and_split_is_written_and_reads_back_clean(built):
    summary, a, _, folders = built
    for task in TASKS:
        for split in SPLIT_SCENES:
            f = folders[task, split]
            assert (a / task / split / MANIFEST).is_file() and f.split == split
            assert f.skipped == {} and len(f.examples) == summary[task][split] > 0
            assert f.meta["seed"] == SMALL["seed"] and f.meta["num_scenes"] == SPLIT_SCENES[split]
            assert 0 < f.meta["chance"] < 1
    assert folders["vqa", "train"].labels == list(VQA_ANSWERS)


def test_ids_are_unique(built):
    for (task, split), f in built[3].items():
        ids = [e["id"] for e in f.examples]
        assert len(ids) == len(set(ids)), (task, split)


def _image_ids(e: dict) -> list[str]:
    return e["image_ids"] if "image_ids" in e else [e["image_id"]]


def test_images_are_the_split_scenes_and_splits_share_none(built, scenes):
    used = {split: set() for split in SPLIT_SCENES}
    for (task, split), f in built[3].items():
        for e in f.examples:
            assert set(_image_ids(e)) <= scenes[split].keys(), (task, e["id"])
            used[split].update(_image_ids(e))
    assert not used["train"] & used["val"]
    train_feats = {s.features.tobytes() for s in scenes["train"].values()}
    assert not any(s.features.tobytes() in train_feats for s in scenes["val"].values())


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    _, a, b, _ = built
    for task in TASKS:
        for split in SPLIT_SCENES:
            for name in (EXAMPLES, MANIFEST):
                assert (a / task / split / name).read_bytes() == (b / task / split / name).read_bytes()
    write_demo_tasks(tmp_path, region_dirs=None, **{**SMALL, "seed": 6})
    assert (tmp_path / "vqa" / "val" / EXAMPLES).read_bytes() != (a / "vqa" / "val" / EXAMPLES).read_bytes()


def test_region_dirs_of_other_scenes_are_refused(tmp_path):
    args = dict(seed=1, n_train_scenes=12, n_val_scenes=6, img_dim=8, noise_std=0.5)
    write_demo_dataset(tmp_path / "regions", scenes_per_shard=5, **args)
    dirs = {split: tmp_path / "regions" / split for split in SPLIT_SCENES}
    summary = write_demo_tasks(tmp_path / "ok", region_dirs=dirs, **args)
    assert read_task_folder(tmp_path / "ok" / "ve" / "val").meta["features"] == str(dirs["val"])
    assert summary["retrieval"] == {"train": 24, "val": 12}
    with pytest.raises(ValueError, match="same `vlpt demo-data` arguments"):
        write_demo_tasks(tmp_path / "bad", region_dirs=dirs, **{**args, "seed": 2})


# ------------------------------------------------------------ balance

def _shares(labels) -> list[float]:
    counts = Counter(labels)
    return [v / len(labels) for v in counts.values()]


def test_label_balance(built):
    folders = built[3]
    for split in SPLIT_SCENES:
        ve = [e["label"] for e in folders["ve", split].examples]
        assert set(ve) == {0, 1, 2} and all(abs(s - 1 / 3) < 0.03 for s in _shares(ve))
        nlvr2 = [e["label"] for e in folders["nlvr2", split].examples]
        assert Counter(nlvr2)[0] == Counter(nlvr2)[1]
        vcr = folders["vcr", split].examples
        for key in ("answer_label", "rationale_label"):
            counts = Counter(e[key] for e in vcr)
            assert set(counts) <= set(range(NUM_CHOICES)) and max(counts.values()) - min(counts.values()) <= 1
    re_targets = [e["target"] for e in folders["re", "train"].examples]
    assert len(set(re_targets)) >= 6  # the random region order spreads the targets


def _vqa_family(text: str) -> str:
    if text.startswith("how many objects"):
        return "count_all"
    return "count_colour" if text.startswith("how many") else " ".join(text.split()[:2])


def test_vqa_answers_are_balanced_within_each_question_family(built):
    families = defaultdict(Counter)
    for e in built[3]["vqa", "train"].examples:
        families[_vqa_family(e["text"])][VQA_ANSWERS[e["labels"][0]]] += 1
    expected = {"what colour": set(DEMO_COLOURS), "what shape": set(DEMO_SHAPES), "is there": {"yes", "no"},
                "count_colour": {"one", "two"}, "count_all": {"two", "three", "four"}}
    assert families.keys() == expected.keys()
    for family, answers in expected.items():
        counts = families[family]
        assert set(counts) <= answers, family
        assert max(counts.values()) - min(counts[a] for a in answers) <= 3, (family, counts)


# ------------------------------------------------------------ labels true to the scenes

def _vqa_answer(view: View, text: str) -> str:
    if m := re.fullmatch(rf"what colour is the ({SHAPE})\?", text):
        (key,) = [k for k in view.regions if DEMO_SHAPES[k[0]] == m[1]]  # the shape is in view once
        return DEMO_COLOURS[key[1]]
    if m := re.fullmatch(rf"what shape is the ({COLOUR}) object\?", text):
        (key,) = [k for k in view.regions if DEMO_COLOURS[k[1]] == m[1]]
        return DEMO_SHAPES[key[0]]
    if m := re.fullmatch(rf"how many (?:({COLOUR}) )?objects are there\?", text):
        return NUMBERS[view.count(m[1]) - 1]
    m = re.fullmatch(rf"is there ({NP})\?", text)
    assert m, text
    return "yes" if view.find(m[1]) else "no"


def test_vqa_answers_are_right(built, scenes):
    for split in SPLIT_SCENES:
        for e in built[3]["vqa", split].examples:
            assert e["scores"] == [1.0] and len(e["labels"]) == 1
            assert VQA_ANSWERS[e["labels"][0]] == _vqa_answer(View(scenes[split][e["image_id"]]), e["text"]), e


def _ve_label(view: View, text: str) -> int:
    if m := re.fullmatch(rf"the ({SHAPE}) is ({COLOUR})", text):
        keys = [k for k in view.regions if DEMO_SHAPES[k[0]] == m[1]]
        if not keys:
            return 2  # not in view: open world, undecidable
        (key,) = keys
        return int(DEMO_COLOURS[key[1]] == m[2])
    m = re.fullmatch(rf"({NP}) is ({REL}) ({NP})", text)
    assert m, text
    a, b = view.find(m[1]), view.find(m[3])
    if a is None or b is None:
        return 2
    return int(view.rel(a, b) == m[2])


def test_ve_labels_are_right(built, scenes):
    for split in SPLIT_SCENES:
        for e in built[3]["ve", split].examples:
            assert e["label"] == _ve_label(View(scenes[split][e["image_id"]]), e["text"]), e


def test_retrieval_is_the_scene_captions(built, scenes):
    for split in SPLIT_SCENES:
        examples = built[3]["retrieval", split].examples
        assert len(examples) == 2 * SPLIT_SCENES[split]
        for e in examples:
            scene = scenes[split][e["image_id"]]
            assert e["text"] == scene.captions[int(e["id"].rsplit("-", 1)[1])]


def _nlvr2_truth(left: View, right: View, text: str) -> bool:
    side = {"left": left, "right": right}
    if m := re.fullmatch(rf"the (left|right) image has more (?:({COLOUR}) )?objects than the (left|right) one", text):
        return side[m[1]].count(m[2]) > side[m[3]].count(m[2])
    if m := re.fullmatch(rf"both images contain a ({SHAPE})", text):
        return all(any(DEMO_SHAPES[s] == m[1] for s, _ in v.regions) for v in (left, right))
    if m := re.fullmatch(rf"both images contain an? ({COLOUR}) object", text):
        return left.count(m[1]) > 0 and right.count(m[1]) > 0
    m = re.fullmatch(rf"the (left|right) image contains ({NP})", text)
    assert m, text
    return side[m[1]].find(m[2]) is not None


def test_nlvr2_labels_are_right_and_sentences_group(built, scenes):
    for split in SPLIT_SCENES:
        groups = defaultdict(list)
        for e in built[3]["nlvr2", split].examples:
            left, right = (View(scenes[split][i]) for i in e["image_ids"])
            assert e["image_ids"][0] != e["image_ids"][1]
            assert e["label"] == int(_nlvr2_truth(left, right, e["text"])), e
            groups[e["id"].rsplit("-", 1)[0]].append(e)
        for group in groups.values():  # one sentence over 4 pairs, 2 true and 2 false
            assert len({e["text"] for e in group}) == 1 and sorted(e["label"] for e in group) == [0, 0, 1, 1]
            assert len({tuple(e["image_ids"]) for e in group}) == 4


def _re_referents(view: View, text: str) -> set:
    m = re.fullmatch(rf"the (?:({COLOUR}) )?(?:({SHAPE})|object)(?: ({REL}) the ((?:{COLOUR}) (?:{SHAPE})))?", text)
    assert m, text
    fits = {k for k in view.regions if m[1] in (None, DEMO_COLOURS[k[1]]) and m[2] in (None, DEMO_SHAPES[k[0]])}
    if m[3]:
        ref = view.find(m[4])
        fits = {k for k in fits if k != ref and view.rel(k, ref) == m[3]}
    return fits


def test_re_targets_the_confident_proposal_of_the_one_referred_object(built, scenes):
    for split in SPLIT_SCENES:
        for e in built[3]["re", split].examples:
            scene = scenes[split][e["image_id"]]
            view = View(scene)
            (key,) = _re_referents(view, e["text"])  # the expression fits one object
            assert view.regions[key] == (e["target"], e["twin"]) and scene.conf[e["target"]] > scene.conf[e["twin"]]
            assert box_iou(scene.norm_bb[e["target"]], scene.norm_bb[e["twin"]]) <= MAX_TWIN_IOU
            x1, y1, x2, y2 = scene.norm_bb[e["target"], :4] * 100
            assert np.allclose(e["box"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
            assert (e["width"], e["height"]) == (100, 100)


def _vcr_check(view: View, e: dict) -> None:
    m = re.fullmatch(rf"what is ({REL}) ({NP})\?", e["question"])
    assert m, e["question"]
    rel, ref = m[1], view.find(m[2])
    right = [k for k in view.regions if k != ref and view.rel(k, ref) == rel]
    assert len(right) == 1 and len(set(e["answers"])) == NUM_CHOICES and len(set(e["rationales"])) == NUM_CHOICES
    for i, answer in enumerate(e["answers"]):
        assert (view.find(answer) == right[0]) == (i == e["answer_label"]), e
    for i, rationale in enumerate(e["rationales"]):
        r = re.fullmatch(rf"({NP}) is ({REL}) ({NP}) and ({REL}) ({NP})", rationale)
        assert r and r[1] == e["answers"][e["answer_label"]] and (r[2], r[3]) == (m[1], m[2])
        other = view.find(r[5])
        assert (other is not None and view.rel(right[0], other) == r[4]) == (i == e["rationale_label"]), e


def test_vcr_answers_and_rationales_are_right(built, scenes):
    for split in SPLIT_SCENES:
        for e in built[3]["vcr", split].examples:
            _vcr_check(View(scenes[split][e["image_id"]]), e)


def test_re_passes_over_objects_the_picker_has_no_expression_for():
    scenes = list(generate_scenes("val", 40, seed=0, img_dim=16, noise_std=0.5))
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert re_examples(scenes, rng(), 2) == re_examples(scenes, rng(), 2, pick_expression)  # the default
    only_balls = lambda scene, objects, o, r: "the ball" if DEMO_SHAPES[o.shape] == "ball" else None  # noqa: E731
    picked = re_examples(scenes, rng(), 2, only_balls)
    per_scene = Counter(e["image_id"] for e in picked)
    assert picked and max(per_scene.values()) <= 2
    for e in picked:
        scene = next(s for s in scenes if s.image_id == e["image_id"])
        assert DEMO_SHAPES[scene.objects[e["target"]][0]] == "ball" and e["text"] == "the ball"
    for image_id, n in per_scene.items():  # ids count the picked objects of a scene: -0, -1
        assert sorted(e["id"] for e in picked if e["image_id"] == image_id) == [f"{image_id}-{k}" for k in range(n)]
