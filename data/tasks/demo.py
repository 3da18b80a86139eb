"""Demo downstream tasks on the demo scenes (docs/downstream.md, "Task folders").

`write_demo_tasks` writes `out_dir/<task>/{train,val}` task folders for the six tasks. Their examples
name the scenes `vlpt demo-data` writes as region shards (data/demo.py): the same `generate_scenes`
arguments regenerate exactly those scenes, so train examples read demo_data/train and val examples
demo_data/val by image id (`train-scene-000123`), and the two splits share no scene. Every example
is true to the scene model (data/demo_scenes.py): an object is a (shape, colour) pair proposed by two
overlapping regions; relations ("left of", ...) are `spatial_relation` of the objects' more confident
boxes, as in the captions. Task streams are seeded apart from the scene streams, so the same seed
gives the same bytes.

Labels are balanced within each text template, so a text-only model sits at chance:

| task | per scene | balance | chance (and the text-only level) |
|---|---|---|---|
| `vqa` | 4 questions | answers equal per question family | see below; about 0.29 overall (meta) |
| `ve` | 3 (one per label) | 1/3 each | 1/3 |
| `retrieval` | 2 (its captions) | - | R@K = K / images, both directions |
| `nlvr2` | 2 (4 pairs a sentence) | 2 true, 2 false per sentence | 1/2; consistency 1/16 |
| `re` | 2 (two objects) | target index random | 1 / regions of the image, ~0.13 (meta) |
| `vcr` | 1 (3+ objects) | labels cycle 0..3 | Q->A 1/4, QA->R 1/4, Q->AR 1/16 |

VQA families: "what colour is the <shape>?" 1/8, "what shape is the <colour> object?" 1/8, "how many
objects are there?" 1/3 (two..four), "how many <colour> objects are there?" 1/2 (one, two), "is there
<a colour shape>?" 1/2 (the "no" object shares a colour or a shape with one in view). Each manifest's
meta holds `chance`, computed on its examples.

Task definitions, where a choice was needed:
- VE is open-world: the picture may be a crop, so a statement about an object not in view is
  undecidable (neutral: it may lie outside the frame), while a false statement about objects in
  view is a contradiction (wrong colour, or the opposite relation). Both hypothesis templates ("a red
  cube is left of a blue ball", "the cube is red") carry all three labels, so the text alone tells
  nothing.
- RE targets the referred object's more confident proposal. Its twin overlaps it with IoU 0.65-0.86
  (5th-95th percentile; meta `twin_iou`), so RE is scored by region index (the target among the
  image's regions): an IoU >= 0.5 test against `box` would accept the twin. Objects whose twin has
  IoU > 0.9 are not referred to (about 1%: a coin flip, not a grounding test). Telling the twins
  apart needs the box geometry (the confident box has its shape's typical aspect ratio), so
  object-level accuracy (target or `twin`, stored with each example) is the grounding score and
  index accuracy sits below it.
- VCR rationales restate the answer and add a second fact: "<answer> is <rel> <referent> and <rel2>
  <other object>". The first clause is the same in all four and each second-clause object is named
  twice, in opposite relations, so QA->R needs the picture (which second fact is true?), not text
  matching with the gold answer.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from data.demo_scenes import (
    DEMO_COLOURS, DEMO_SHAPES, DemoScene, check_demo_args, generate_scenes, noun_phrase,
    spatial_relation,
)
from data.tasks.folder import write_task_folder
from data.tasks.records import TASKS

SPLITS = ("train", "val")
NUMBERS = ("one", "two", "three", "four")
VQA_ANSWERS = (*DEMO_COLOURS, *DEMO_SHAPES, *NUMBERS, "yes", "no")
"""The VQA answer vocabulary (manifest `labels`): every answer a demo question can have."""
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DIRECTIONS = tuple(OPPOSITE)
"""Relations with an opposite: "next to" has none, so it is never used as a contradiction."""
MAX_TWIN_IOU = 0.9
"""RE skips objects whose two proposals are nearly the same box (see the module docstring)."""
NLVR2_PAIRS = 4
"""Image pairs per NLVR2 sentence (2 true, 2 false), as NLVR2 shows a sentence with several pairs."""
NLVR2_GRID = 256
"""Scenes sampled per side when searching pairs for one NLVR2 sentence."""
_STREAM_SALT = 0x7A5C
"""Task streams are SeedSequence([seed, salt, task, split]): apart from the scenes' SeedSequence(seed)."""


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its (shape, colour), its more confident region and that region's twin."""

    shape: int
    colour: int
    region: int
    twin: int

    @property
    def phrase(self) -> str:
        """'a red cube'."""
        return noun_phrase(DEMO_COLOURS[self.colour], DEMO_SHAPES[self.shape])

    @property
    def name(self) -> str:
        """'red cube'."""
        return f"{DEMO_COLOURS[self.colour]} {DEMO_SHAPES[self.shape]}"


def scene_objects(scene: DemoScene) -> list[SceneObject]:
    """The scene's objects in stored region order of their more confident proposal."""
    regions: dict[tuple[int, int], list[int]] = {}
    for i, o in enumerate(scene.objects):
        if o is not None:
            regions.setdefault(tuple(o), []).append(i)
    out = []
    for (s, c), (i, j) in regions.items():  # the demo proposes every object exactly twice
        hi, lo = (i, j) if scene.conf[i] >= scene.conf[j] else (j, i)
        out.append(SceneObject(s, c, hi, lo))
    return sorted(out, key=lambda o: o.region)


def relation(scene: DemoScene, a: SceneObject, b: SceneObject) -> str:
    """Relation of a to b, from the confident boxes (the ones the captions describe)."""
    return spatial_relation(scene.norm_bb[a.region], scene.norm_bb[b.region])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two norm_bb rows [x1, y1, x2, y2, ...]."""
    w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = w * h
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def absent_objects(objects: list[SceneObject]) -> list[tuple[int, int]]:
    """Every (shape, colour) not in the scene."""
    present = {(o.shape, o.colour) for o in objects}
    return [k for k in itertools.product(range(len(DEMO_SHAPES)), range(len(DEMO_COLOURS))) if k not in present]


def phrase_of(shape: int, colour: int) -> str:
    return noun_phrase(DEMO_COLOURS[colour], DEMO_SHAPES[shape])


def task_rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM_SALT, TASKS.index(task),
                                                        SPLITS.index(split)]))


def pick_balanced(rng: np.random.Generator, candidates: list, counts: Counter, answer: Callable,
                  answers: Optional[tuple] = None, slack: Optional[int] = None):
    """A candidate whose answer was given least so far (ties at random), counted in `counts`.

    With `slack`, None when every available answer is over `slack` ahead of the rarest of `answers`
    (so a family whose rare answer is scarce stays balanced by asking less)."""
    if not candidates:
        return None
    least = min(counts[answer(c)] for c in candidates)
    if slack is not None and least > min(counts[a] for a in answers) + slack:
        return None
    best = [c for c in candidates if counts[answer(c)] == least]
    pick = best[int(rng.integers(len(best)))]
    counts[answer(pick)] += 1
    return pick


# ------------------------------------------------------------------ VQA

def _vqa_colour_shape(objects: list[SceneObject]) -> tuple[list, list]:
    shapes, colours = Counter(o.shape for o in objects), Counter(o.colour for o in objects)
    colour_q = [(f"what colour is the {DEMO_SHAPES[o.shape]}?", DEMO_COLOURS[o.colour])
                for o in objects if shapes[o.shape] == 1]
    shape_q = [(f"what shape is the {DEMO_COLOURS[o.colour]} object?", DEMO_SHAPES[o.shape])
               for o in objects if colours[o.colour] == 1]
    return colour_q, shape_q


def _vqa_exists(rng: np.random.Generator, objects: list[SceneObject]) -> tuple[list, list]:
    """Yes: a present object. No: an absent one sharing a colour or a shape with a present object
    (so the answer needs the binding of colour to shape, not one word)."""
    yes = [(f"is there {o.phrase}?", "yes") for o in objects]
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    near = [k for k in absent_objects(objects) if k[0] in shapes or k[1] in colours]
    no = [(f"is there {phrase_of(*near[int(rng.integers(len(near)))])}?", "no")] if near else []
    return yes, no


def _vqa_count(rng, objects, counts: dict[str, Counter]) -> Optional[tuple[str, str]]:
    colours = Counter(o.colour for o in objects)
    by_colour = [(f"how many {DEMO_COLOURS[c]} objects are there?", NUMBERS[n - 1])
                 for c, n in colours.items() if n <= 2]
    if rng.random() < 0.5:  # one or two of a colour; "two" is scarcer, so ask when it keeps balance
        q = pick_balanced(rng, by_colour, counts["count_colour"], lambda x: x[1], NUMBERS[:2], slack=1)
        if q is not None:
            return q
    total = [("how many objects are there?", NUMBERS[len(objects) - 1])]
    return pick_balanced(rng, total, counts["count_all"], lambda x: x[1], NUMBERS[1:4], slack=2)


def vqa_examples(scenes: list[DemoScene], rng: np.random.Generator) -> list[dict]:
    counts: dict[str, Counter] = {k: Counter() for k in ("colour", "shape", "count_colour", "count_all", "exists")}
    index = {a: i for i, a in enumerate(VQA_ANSWERS)}
    out = []
    for scene in scenes:
        objects = scene_objects(scene)
        colour_q, shape_q = _vqa_colour_shape(objects)
        yes, no = _vqa_exists(rng, objects)
        picks = [pick_balanced(rng, colour_q, counts["colour"], lambda x: x[1]),
                 pick_balanced(rng, shape_q, counts["shape"], lambda x: x[1]),
                 _vqa_count(rng, objects, counts),
                 pick_balanced(rng, [yes[int(rng.integers(len(yes)))]] + no, counts["exists"], lambda x: x[1])]
        for k, q in enumerate(p for p in picks if p is not None):
            out.append({"id": f"{scene.image_id}-{k}", "image_id": scene.image_id, "text": q[0],
                        "labels": [index[q[1]]], "scores": [1.0]})
    return out


# ------------------------------------------------------------------ VE

def _ve_relation(rng, scene, objects, label: int) -> Optional[str]:
    """'a red cube is left of a blue ball': true (1), opposite relation (0), one object not in view (2)."""
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2) if relation(scene, a, b) in DIRECTIONS]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    rel = relation(scene, a, b)
    if label == 1:
        return f"{a.phrase} is {rel} {b.phrase}"
    if label == 0:
        return f"{a.phrase} is {OPPOSITE[rel]} {b.phrase}"
    absent = absent_objects(objects)
    other = phrase_of(*absent[int(rng.integers(len(absent)))])
    rel = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    return f"{a.phrase} is {rel} {other}" if rng.random() < 0.5 else f"{other} is {rel} {a.phrase}"


def _ve_attribute(rng, objects, label: int) -> Optional[str]:
    """'the cube is red': the one cube is red (1), another colour (0), no cube in view (2)."""
    shapes = Counter(o.shape for o in objects)
    if label == 2:
        missing = [s for s in range(len(DEMO_SHAPES)) if s not in shapes]
        s, c = missing[int(rng.integers(len(missing)))], int(rng.integers(len(DEMO_COLOURS)))
        return f"the {DEMO_SHAPES[s]} is {DEMO_COLOURS[c]}"
    unique = [o for o in objects if shapes[o.shape] == 1]
    if not unique:
        return None
    o = unique[int(rng.integers(len(unique)))]
    c = o.colour if label == 1 else int((o.colour + rng.integers(1, len(DEMO_COLOURS))) % len(DEMO_COLOURS))
    return f"the {DEMO_SHAPES[o.shape]} is {DEMO_COLOURS[c]}"


def ve_examples(scenes: list[DemoScene], rng: np.random.Generator) -> list[dict]:
    out = []
    for scene in scenes:
        objects = scene_objects(scene)
        for label in (0, 1, 2):  # one of each label per scene: balanced by construction
            first = rng.random() < 0.5  # the template is drawn apart from the label
            makers = [lambda: _ve_relation(rng, scene, objects, label), lambda: _ve_attribute(rng, objects, label)]
            text = makers[0 if first else 1]() or makers[1 if first else 0]()
            if text:
                out.append({"id": f"{scene.image_id}-{label}", "image_id": scene.image_id, "text": text,
                            "label": label})
    return out


# ------------------------------------------------------------------ retrieval

def retrieval_examples(scenes: list[DemoScene], rng: np.random.Generator) -> list[dict]:
    """The scene's captions, ids as the region shards' caption ids (data/demo_scenes.py)."""
    return [{"id": f"{s.image_id}-{c}", "image_id": s.image_id, "text": t}
            for s in scenes for c, t in enumerate(s.captions)]


# ------------------------------------------------------------------ NLVR2

@dataclass(frozen=True)
class _Facts:
    """Per-scene counts the NLVR2 statements compare, one row per scene."""

    n_objects: np.ndarray  # [n]
    colour_count: np.ndarray  # [n, colours]
    has_shape: np.ndarray  # [n, shapes] bool
    has_object: np.ndarray  # [n, shapes, colours] bool


def scene_facts(scenes: list[DemoScene]) -> _Facts:
    n = len(scenes)
    count = np.zeros((n, len(DEMO_COLOURS)), dtype=np.int64)
    has = np.zeros((n, len(DEMO_SHAPES), len(DEMO_COLOURS)), dtype=bool)
    for i, scene in enumerate(scenes):
        for o in scene_objects(scene):
            count[i, o.colour] += 1
            has[i, o.shape, o.colour] = True
    return _Facts(count.sum(1), count, has.any(2), has)


def nlvr2_statement(kind: int, shape: int, colour: int, facts: _Facts):
    """(text, left values [n], right values [n], op) for statement `kind`; the statement holds for
    the pair (i, j) when op(left[i], right[j])."""
    s, c, ones = DEMO_SHAPES[shape], DEMO_COLOURS[colour], np.ones(len(facts.n_objects), dtype=bool)
    more, both = np.greater, np.logical_and
    count_c, has_s = facts.colour_count[:, colour], facts.has_shape[:, shape]
    has_sc = facts.has_object[:, shape, colour]
    table = [
        (f"the left image has more {c} objects than the right one", count_c, count_c, more),
        (f"the right image has more {c} objects than the left one", count_c, count_c, np.less),
        ("the left image has more objects than the right one", facts.n_objects, facts.n_objects, more),
        ("the right image has more objects than the left one", facts.n_objects, facts.n_objects, np.less),
        (f"both images contain a {s}", has_s, has_s, both),
        (f"the left image contains {phrase_of(shape, colour)}", has_sc, ones, both),
        (f"the right image contains {phrase_of(shape, colour)}", ones, has_sc, both),
        (f"both images contain {noun_phrase(c, 'object')}", count_c > 0, count_c > 0, both),
    ]
    return table[kind]


NLVR2_KINDS = 8


def _nlvr2_pairs(rng, statement, n: int) -> Optional[list[tuple[int, int, int]]]:
    """NLVR2_PAIRS distinct (left, right, label) pairs of distinct scenes, half true, or None."""
    _, left, right, op = statement
    rows = rng.choice(n, size=min(n, NLVR2_GRID), replace=False)
    cols = rng.choice(n, size=min(n, NLVR2_GRID), replace=False)
    truth = op(left[rows][:, None], right[cols][None, :])  # [r, c]
    valid = rows[:, None] != cols[None, :]
    picked = []
    for label, mask in ((1, truth & valid), (0, ~truth & valid)):
        flat = np.flatnonzero(mask)
        if len(flat) < NLVR2_PAIRS // 2:
            return None
        for k in rng.choice(flat, size=NLVR2_PAIRS // 2, replace=False):
            picked.append((int(rows[k // len(cols)]), int(cols[k % len(cols)]), label))
    return [picked[k] for k in rng.permutation(len(picked))]


def nlvr2_examples(scenes: list[DemoScene], rng: np.random.Generator, split: str) -> list[dict]:
    """max(1, scenes // 2) sentences, each over NLVR2_PAIRS pairs; ids `<split>-<sentence>-<pair>`."""
    facts, n, out = scene_facts(scenes), len(scenes), []
    if n < 2:
        return out
    for g in range(max(1, n // 2)):
        for _ in range(20):  # statements no pair makes true (or false) are drawn again
            anchor = scene_objects(scenes[int(rng.integers(n))])  # the statement names a real object
            o = anchor[int(rng.integers(len(anchor)))]
            statement = nlvr2_statement(int(rng.integers(NLVR2_KINDS)), o.shape, o.colour, facts)
            pairs = _nlvr2_pairs(rng, statement, n)
            if pairs:
                break
        else:
            continue
        for k, (i, j, label) in enumerate(pairs):
            out.append({"id": f"{split}-{g:06d}-{k}", "image_ids": [scenes[i].image_id, scenes[j].image_id],
                        "text": statement[0], "label": label})
    return out


# ------------------------------------------------------------------ RE

def _re_expressions(scene: DemoScene, objects: list[SceneObject], o: SceneObject) -> tuple[list[str], list[str]]:
    """(plain, relational) expressions that fit `o` and no other object; relational ones name o's
    shape only and need the relation to pick it among objects of that shape."""
    shapes, colours = Counter(x.shape for x in objects), Counter(x.colour for x in objects)
    plain = [f"the {o.name}"]
    if shapes[o.shape] == 1:
        plain.append(f"the {DEMO_SHAPES[o.shape]}")
    if colours[o.colour] == 1:
        plain.append(f"the {DEMO_COLOURS[o.colour]} object")
    relational = []
    for ref in objects:
        if ref is o:
            continue
        rel = relation(scene, o, ref)
        plain.append(f"the {o.name} {rel} the {ref.name}")
        rivals = [x for x in objects if x is not ref and x is not o and x.shape == o.shape]
        if rivals and all(relation(scene, x, ref) != rel for x in rivals):
            relational.append(f"the {DEMO_SHAPES[o.shape]} {rel} the {ref.name}")
    return plain, relational


def pick_expression(scene: DemoScene, objects: list[SceneObject], o: SceneObject,
                    rng: np.random.Generator) -> Optional[str]:
    """The demo's RE expression for `o`: a relational one half the time when there is one, else a plain one."""
    plain, relational = _re_expressions(scene, objects, o)
    pool = relational if relational and rng.random() < 0.5 else plain
    return pool[int(rng.integers(len(pool)))]


def _pixel_box(norm_bb) -> list[float]:
    """A normalised [x1, y1, x2, y2, ...] region box as [x, y, w, h] on the 100 x 100 scene canvas."""
    x1, y1, x2, y2 = (float(v) for v in norm_bb[:4])
    return [round(x1 * 100, 4), round(y1 * 100, 4), round((x2 - x1) * 100, 4), round((y2 - y1) * 100, 4)]


ExpressionPicker = Callable[[DemoScene, list[SceneObject], SceneObject, np.random.Generator], Optional[str]]


def re_examples(scenes: list[DemoScene], rng: np.random.Generator, per_scene: int = 2,
                pick: ExpressionPicker = pick_expression) -> list[dict]:
    """Up to `per_scene` referred objects per scene, in random order; an object `pick` finds no
    expression for (None) is passed over (benchmarks/re_demo_study.py's variants)."""
    out = []
    for scene in scenes:
        objects = scene_objects(scene)
        usable = [o for o in objects
                  if box_iou(scene.norm_bb[o.region], scene.norm_bb[o.twin]) <= MAX_TWIN_IOU]
        k = 0
        for i in rng.permutation(len(usable)):
            if k == per_scene:
                break
            o = usable[int(i)]
            text = pick(scene, objects, o, rng)
            if text is None:
                continue
            boxes = [_pixel_box(b) for b in scene.norm_bb]  # every proposal: ALBEF grounding's candidates
            out.append({"id": f"{scene.image_id}-{k}", "image_id": scene.image_id, "text": text,
                        "target": o.region, "box": boxes[o.region], "boxes": boxes, "width": 100, "height": 100,
                        "twin": o.twin})
            k += 1
    return out


# ------------------------------------------------------------------ VCR

def _vcr_question(rng, scene: DemoScene, objects: list[SceneObject]):
    """(answer object, referent, relation, third object) where the answer is the one object in that
    relation to the referent and stands in a direction from a third object, or None."""
    options = []
    for ref in objects:
        rels = Counter(relation(scene, x, ref) for x in objects if x is not ref)
        for ans in objects:
            rel = relation(scene, ans, ref) if ans is not ref else None
            if rel is None or rels[rel] != 1:
                continue
            options += [(ans, ref, rel, z) for z in objects
                        if z is not ans and z is not ref and relation(scene, ans, z) in DIRECTIONS]
    return options[int(rng.integers(len(options)))] if options else None


def _vcr_false_clauses(rng, scene, objects, ans: SceneObject, ref: SceneObject, z: SceneObject) -> list[str]:
    """Three false "<rel> <object>" clauses about `ans`: the opposite of its relation to z, and two
    opposite relations to one other object w, both false (w absent, or w in view along the other
    axis). Each object is then named by two of the four rationales, in opposite relations, so the
    text cannot tell the true one. The referent is left out: a second relation to it would
    contradict the first clause in the text."""
    others = [x for x in objects if x not in (ans, ref, z)]
    if others and rng.random() < 0.5:
        w = others[int(rng.integers(len(others)))]
        phrase, true_w = w.phrase, relation(scene, ans, w)
    else:
        absent = absent_objects(objects)
        phrase, true_w = phrase_of(*absent[int(rng.integers(len(absent)))]), None
    axes = [r for r in ("left of", "above") if true_w not in (r, OPPOSITE[r])]
    r = axes[int(rng.integers(len(axes)))]
    return [f"{OPPOSITE[relation(scene, ans, z)]} {z.phrase}", f"{r} {phrase}", f"{OPPOSITE[r]} {phrase}"]


def _next_label(rng, queue: list[int]) -> int:
    """Labels drawn from shuffled blocks of 0..3: uniform to within one block."""
    if not queue:
        queue.extend(int(k) for k in rng.permutation(4))
    return queue.pop()


def _place(right: str, wrong: list[str], label: int) -> list[str]:
    return wrong[:label] + [right] + wrong[label:]


def vcr_examples(scenes: list[DemoScene], rng: np.random.Generator) -> list[dict]:
    out, answer_q, rationale_q = [], [], []
    for scene in scenes:
        objects = scene_objects(scene)
        picked = _vcr_question(rng, scene, objects) if len(objects) >= 3 else None
        if picked is None:
            continue
        ans, ref, rel, z = picked
        others = [x.phrase for x in objects if x is not ans and x is not ref]
        absent = [phrase_of(*k) for k in absent_objects(objects)]
        wrong = [others[int(i)] for i in rng.permutation(len(others))][:2]
        wrong += [absent[int(i)] for i in rng.choice(len(absent), size=3 - len(wrong), replace=False)]
        stem = f"{ans.phrase} is {rel} {ref.phrase} and"
        false = [f"{stem} {c}" for c in _vcr_false_clauses(rng, scene, objects, ans, ref, z)]
        wrong, false = [wrong[int(i)] for i in rng.permutation(3)], [false[int(i)] for i in rng.permutation(3)]
        a, r = _next_label(rng, answer_q), _next_label(rng, rationale_q)
        out.append({"id": f"{scene.image_id}-0", "image_id": scene.image_id, "question": f"what is {rel} {ref.phrase}?",
                    "answers": _place(ans.phrase, wrong, a),
                    "rationales": _place(f"{stem} {relation(scene, ans, z)} {z.phrase}", false, r),
                    "answer_label": a, "rationale_label": r})
    return out


# ------------------------------------------------------------------ writer

def _chance(task: str, examples: list[dict], scenes: list[DemoScene]) -> Optional[float]:
    """The task's chance score on these examples (the module docstring's table)."""
    if not examples:
        return None
    if task == "vqa":
        families = {"what colour": 8, "what shape": 8, "how many objects": 3, "how many": 2, "is there": 2}
        sizes = [next(v for k, v in families.items() if e["text"].startswith(k)) for e in examples]
        return float(np.mean([1 / v for v in sizes]))
    if task == "re":
        regions = {s.image_id: len(s.objects) for s in scenes}
        return float(np.mean([1 / regions[e["image_id"]] for e in examples]))
    return {"ve": 1 / 3, "retrieval": 1 / len(scenes), "nlvr2": 1 / 2, "vcr": 1 / 16}[task]


def _twin_iou(examples: list[dict], scenes: list[DemoScene]) -> dict:
    """How far the RE targets' twins overlap them (why RE is scored by index, not box IoU)."""
    by_id = {s.image_id: s for s in scenes}
    ious = [box_iou(by_id[e["image_id"]].norm_bb[e["target"]], by_id[e["image_id"]].norm_bb[e["twin"]])
            for e in examples]
    if not ious:
        return {}
    return {"min": round(min(ious), 4), "mean": round(float(np.mean(ious)), 4), "max": round(max(ious), 4),
            "share_ge_0.5": round(float(np.mean(np.array(ious) >= 0.5)), 4)}


def _build(task: str, scenes: list[DemoScene], rng: np.random.Generator, split: str) -> list[dict]:
    if task == "nlvr2":
        return nlvr2_examples(scenes, rng, split)
    return {"vqa": vqa_examples, "ve": ve_examples, "retrieval": retrieval_examples, "re": re_examples,
            "vcr": vcr_examples}[task](scenes, rng)


def _check_region_dir(region_dir: Optional[Path], expect: dict) -> None:
    """ValueError when a demo region shard folder was written with other generator arguments: its
    image ids would name other scenes than these examples describe."""
    if region_dir is None or not (region_dir / "manifest.json").is_file():
        return
    try:
        m = json.loads((region_dir / "manifest.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{region_dir}/manifest.json is not valid JSON ({e})") from None
    found = {k: m.get(k) for k in expect} if isinstance(m, dict) else {}
    if found != expect:
        raise ValueError(f"{region_dir} holds demo scenes {found}, but the tasks are for {expect}; "
                         "write both with the same `vlpt demo-data` arguments")


def write_demo_tasks(out_dir: str | Path, *, seed: int, n_train_scenes: int, n_val_scenes: int, img_dim: int,
                     noise_std: float, region_dirs: Optional[Mapping[str, str | Path]] = None) -> dict:
    """Write `out_dir/<task>/{train,val}` for every task on the demo scenes; return {task: {split: n}}.

    `region_dirs` ({"train": ..., "val": ...}, optional): the region shard folders of the same
    scenes, recorded in each manifest's meta (`features`) and checked against these arguments."""
    check_demo_args(n_train_scenes, n_val_scenes, 1, img_dim, noise_std)
    summary: dict = {task: {} for task in TASKS}
    for split, n in (("train", n_train_scenes), ("val", n_val_scenes)):
        region_dir = Path(region_dirs[split]) if region_dirs and region_dirs.get(split) else None
        args = {"seed": seed, "num_scenes": n, "img_dim": img_dim, "noise_std": noise_std}
        _check_region_dir(region_dir, {**args, "split": split})
        scenes = list(generate_scenes(split, n, seed=seed, img_dim=img_dim, noise_std=noise_std))
        for task in TASKS:
            examples = _build(task, scenes, task_rng(seed, task, split), split)
            meta = {"generator": "vlpt-demo-tasks", **args, "features": str(region_dir) if region_dir else None,
                    "chance": _chance(task, examples, scenes)}
            if task == "re":
                meta["twin_iou"] = _twin_iou(examples, scenes)
            write_task_folder(Path(out_dir) / task / split, task, split, examples,
                              labels=list(VQA_ANSWERS) if task == "vqa" else None, meta=meta)
            summary[task][split] = len(examples)
    return summary
