"""Scoring a held-out split of a downstream task over all ranks (docs/downstream.md, "Evaluation"):
the metrics of each validation and of `vlpt evaluate`, and the predictions `vlpt evaluate` writes.

Rank r scores examples r, r + world, ...; every rank runs the same number of batches (an example
that cannot be used is replaced by a stand-in whose output is dropped), so collectives inside the
model (ZeRO-3) line up. The per-example outputs are gathered and scored the same way on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from data.loader import add_counts, pin
from data.tasks.loader import join_regions
from trainer.distributed import all_gather_objects
from trainer import downstream_metrics as m
from trainer.objectives.downstream import prediction_function

EVAL_SEED = 3
"""Fixed collate RNG of evaluation batches (nothing random is drawn for scoring)."""


@dataclass
class SplitScores:
    metrics: dict[str, float]
    predictions: dict = field(default_factory=dict)
    """What trainer/predictions.py writes for the task."""


def _rank_share(n: int, rank: int, world: int) -> list[int]:
    """Example indices of this rank, padded with -1 to the same length on every rank."""
    mine = list(range(rank, n, world))
    return mine + [-1] * (-(-n // world) - len(mine))


def _usable(examples: list[dict], store, skipped: dict[str, int]) -> list[Optional[tuple]]:
    out = []
    for r in examples:
        images, reason = join_regions(r, store)
        if reason:
            add_counts(skipped, {reason: 1})
        out.append((r, images) if images is not None else None)
    return out


def _outputs(engine, collate: Callable, predict, joined: list[Optional[tuple]], indices: list[int],
             batch_size: int, device, rows_per_item: int = 1) -> dict[int, np.ndarray]:
    """index -> this rank's raw output rows for each usable example it scored."""
    stand_in = next((j for j in joined if j is not None), None)
    out: dict[int, np.ndarray] = {}
    if stand_in is None:  # nothing usable (counted by _usable): the same on every rank, so no batch anywhere
        return out

    def batch_of(chunk: list[int]) -> dict:
        samples = [joined[i] if i >= 0 and joined[i] is not None else stand_in for i in chunk]
        return collate(samples, np.random.default_rng(EVAL_SEED))

    for chunk, values in _batched_outputs(engine, predict, indices, batch_of, batch_size, device):
        values = values.reshape(len(chunk), rows_per_item, -1)  # [n, rows, k]
        for i, v in zip(chunk, values):
            if i >= 0 and joined[i] is not None:
                out[i] = v
    return out


def _batched_outputs(engine, predict, items: list, batch_of: Callable[[list], dict], batch_size: int,
                     device) -> Iterator[tuple[list, np.ndarray]]:
    """(chunk, the model's float outputs for it) for each `batch_size` chunk of `items`, without gradient."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        with torch.no_grad():  # left before yielding: the caller's code never runs in no_grad
            values = engine(pin(batch_of(chunk), device), predict).float().cpu().numpy()
        yield chunk, values


def _gathered(local: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    full: dict[int, np.ndarray] = {}
    for part in all_gather_objects(local):
        full.update(part)
    return full


def score_split(engine, recipe, tok, examples: list[dict], info, skipped: dict[str, int],
                full: bool = False) -> SplitScores:
    """Collective. The task's metrics (docs/downstream.md, "Metrics") over `examples`, and predictions;
    `full`: everything the task's predictions file needs (VCR: QA->R given each of the 4 answers, as its
    leaderboard asks, not only given the right one)."""
    task = recipe.task
    predict = prediction_function(recipe.head_config())
    mine_skipped: dict[str, int] = {}
    engine.eval()
    try:
        if task == "retrieval":
            result = _score_retrieval(engine, recipe, tok, examples, info, predict, mine_skipped, full)
        else:
            joined = _usable(examples, recipe.store, mine_skipped if info.rank == 0 else {})
            indices = _rank_share(len(examples), info.rank, info.world_size)
            result = _score_items(engine, recipe, tok, task, examples, joined, indices, info, predict, full)
    finally:
        engine.train()
    for rank_skips in all_gather_objects(mine_skipped):
        add_counts(skipped, rank_skips)
    return result


def example_outputs(engine, collate: Callable, predict, examples: list[dict], store, info, batch_size: int,
                    skipped: dict[str, int]) -> dict[int, np.ndarray]:
    """Collective. Example index -> the model's output rows, for every usable example of `examples` (their
    images read from `store`), scored over all ranks in eval mode; the unusable ones are counted into `skipped`."""
    mine_skipped: dict[str, int] = {}
    engine.eval()
    try:
        joined = _usable(examples, store, mine_skipped if info.rank == 0 else {})
        indices = _rank_share(len(examples), info.rank, info.world_size)
        out = _gathered(_outputs(engine, collate, predict, joined, indices, batch_size, info.device))
    finally:
        engine.train()
    for rank_skips in all_gather_objects(mine_skipped):
        add_counts(skipped, rank_skips)
    return out


def _score_items(engine, recipe, tok, task, examples, joined, indices, info, predict, full) -> SplitScores:
    bs = recipe.cfg.finetune.eval_batch_size

    def scores(task_joined, rows=1):
        collate = recipe.collate(task, tok)
        return _gathered(_outputs(engine, collate, predict, task_joined, indices, bs, info.device, rows))

    if task == "vcr":
        qa = scores(_with_mode(joined, "qa"), 4)
        labelled = all("answer_label" in r for r in examples)
        given = [scores(_with_mode(joined, "qar", answer=a), 4) for a in range(4)] if full else None
        if given is not None and labelled:  # QA->R given the right answer is one of the four
            qar = {i: given[examples[i]["answer_label"]][i] for i in given[0]}
        else:
            qar = scores(_with_mode(joined, "qar"), 4) if labelled else {}
        return vcr_scores(examples, qa, qar, given)
    out = scores(joined)
    if task in ("vqa", "ve"):
        return classifier_scores(task, examples, out, recipe.labels)
    if task == "nlvr2":
        return nlvr2_scores(examples, out)
    return re_scores(examples, out, joined)


def _with_mode(joined: list[Optional[tuple]], mode: str, answer: Optional[int] = None) -> list[Optional[tuple]]:
    """VCR items of one mode; `answer`: QA->R given that candidate answer instead of the right one."""
    fixed = {} if answer is None else {"answer_label": answer}
    return [({**j[0], "mode": mode, **fixed}, j[1]) if j is not None else None for j in joined]


def _scored(examples: list[dict], out: dict[int, np.ndarray]) -> tuple[list[int], list[dict]]:
    kept = sorted(out)
    return kept, [examples[i] for i in kept]


def classifier_scores(task: str, examples, out, labels: list[str]) -> SplitScores:
    kept, used = _scored(examples, out)
    pred = np.array([int(out[i].reshape(-1).argmax()) for i in kept], dtype=np.int64)
    if task == "vqa":
        metrics = {"score": m.vqa_score(pred, used)} if any("labels" in r for r in used) else {}
    else:
        gold = [r.get("label") for r in used]
        metrics = {"acc": m.accuracy(pred, np.array(gold))} if all(g is not None for g in gold) else {}
    return SplitScores(metrics, {"ids": [r["id"] for r in used], "labels" if task == "ve" else "answers":
                                 [labels[p] for p in pred]})


def nlvr2_scores(examples, out) -> SplitScores:
    kept, used = _scored(examples, out)
    pred = np.array([int(out[i].reshape(-1).argmax()) for i in kept], dtype=np.int64)
    metrics = m.nlvr2_metrics(pred, used) if all("label" in r for r in used) else {}
    return SplitScores(metrics, {"ids": [r["id"] for r in used], "labels": pred.tolist()})


def re_scores(examples, out, joined) -> SplitScores:
    """The argmax region's box in pixels (x1 W, y1 H, w W, h H) against the example's `box`; on GT boxes
    also the exact pick (`index_acc`: the demo's twin proposals overlap their object's box by > 0.5)."""
    kept, used = _scored(examples, out)
    picks = [int(out[i].reshape(-1)[: joined[i][1][0].num_bb].argmax()) for i in kept]
    boxes = []
    for i, r, k in zip(kept, used, picks):
        x1, y1, x2, y2 = (float(v) for v in joined[i][1][0].img_pos[k, :4])
        w, h = float(r.get("width", 1)), float(r.get("height", 1))
        boxes.append([x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h])
    gold = [r["box"] for r in used]
    metrics = {"acc": m.re_accuracy(boxes, gold)} if used else {}
    if used:
        metrics["index_acc"] = float(np.mean([k == r["target"] for k, r in zip(picks, used)]))
    return SplitScores(metrics, {"ids": [r["id"] for r in used], "boxes": boxes, "gold": gold})


def vcr_scores(examples, qa: dict, qar: dict, given: Optional[list[dict]] = None) -> SplitScores:
    """Q->A [q, 4] and QA->R given the right answer [q, 4] (metrics); `given`: QA->R given each
    candidate answer (the leaderboard's [q, 4, 4])."""
    kept = sorted(qa)
    used = [examples[i] for i in kept]
    qa_scores = np.stack([qa[i].reshape(4) for i in kept]) if kept else np.zeros((0, 4))  # [q, 4]
    metrics = {}
    if qar and kept:
        qar_scores = np.stack([qar[i].reshape(4) for i in kept])  # [q, 4]
        if all("rationale_label" in r for r in used):
            metrics = m.vcr_metrics(qa_scores, qar_scores, used)
    payload = {"ids": [r["id"] for r in used], "answer_scores": qa_scores.tolist()}
    if given is not None:
        payload["rationale_scores"] = np.stack([np.stack([g[i].reshape(4) for g in given]) for i in kept]).tolist() \
            if kept else []  # [q, 4 answers, 4 rationales]
    return SplitScores(metrics, payload)


def _score_retrieval(engine, recipe, tok, examples, info, predict, skipped, full: bool) -> SplitScores:
    """Captions against images: every image (`finetune.retrieval_eval: full`, and `vlpt evaluate`), or, as
    UNITER's validation, each caption's own image and the next `retrieval_eval_images` - 1 of the split's image
    list (wrapping). This rank scores its share of the captions; the rows are gathered."""
    f = recipe.cfg.finetune
    images = _split_images(recipe.store, examples, info, skipped)
    image_ids = list(images)
    captions = [r for r in examples if r["image_id"] in images]
    column = {image_id: j for j, image_id in enumerate(image_ids)}
    gt = np.array([column[r["image_id"]] for r in captions], dtype=np.int64)  # [n_txt]
    n_img = len(image_ids)
    validation = not full and f.retrieval_eval == "validation"
    width = min(f.retrieval_eval_images, n_img) if validation else n_img
    columns = (lambda t: [(gt[t] + d) % n_img for d in range(width)]) if validation else (lambda t: range(n_img))
    rows = _gathered(_caption_rows(engine, recipe.collate_pairs(tok), predict, captions, images, image_ids,
                                   columns, width, info, f.eval_batch_size))
    scores = np.stack([rows[t] for t in range(len(captions))]) if captions else np.zeros((0, width))  # [n_txt, w]
    if validation:
        return SplitScores(validation_recalls(scores))
    metrics = m.retrieval_recalls(scores, gt) if len(captions) else {}
    return SplitScores(metrics, {"scores": scores, "text_ids": [r["id"] for r in captions], "image_ids": image_ids,
                                 "recalls": metrics})


def validation_recalls(scores: np.ndarray) -> dict[str, float]:
    """Image R@1/5/10 of UNITER's validation-style retrieval: column 0 of each row is the caption's own image."""
    if not len(scores):
        return {}
    rank = (scores[:, 1:] > scores[:, :1]).sum(axis=1)  # [n_txt] images scoring above the right one
    recalls = {f"img_r{k}": float(np.mean(rank < k)) for k in (1, 5, 10)}
    return {**recalls, "img_r_mean": float(np.mean(list(recalls.values())))}


def _split_images(store, examples, info, skipped) -> dict:
    """image id -> Regions of every usable image of the split, in order of first appearance."""
    images = {}
    for image_id in dict.fromkeys(r["image_id"] for r in examples):
        regions, reason = store.get(image_id)
        if regions is not None:
            images[image_id] = regions
        elif info.rank == 0:  # every rank reads every image: count once
            add_counts(skipped, {reason: 1})
    return images


def _caption_rows(engine, collate, predict, captions, images, image_ids, columns, width, info,
                  batch_size) -> dict[int, np.ndarray]:
    """caption index -> its scores [width] against the images `columns(t)`, for this rank's captions."""
    rows: dict[int, np.ndarray] = {}
    pairs = [(t, c, j) for t in _rank_share(len(captions), info.rank, info.world_size)
             for c, j in enumerate(columns(max(t, 0)))]

    def batch_of(chunk: list[tuple[int, int, int]]) -> dict:
        return collate([(captions[max(t, 0)], images[image_ids[j]]) for t, _, j in chunk])

    for chunk, scores in _batched_outputs(engine, predict, pairs, batch_of, batch_size, info.device):
        for (t, c, _), value in zip(chunk, scores.reshape(-1)):
            if t >= 0:
                rows.setdefault(t, np.zeros(width, np.float32))[c] = value
    return rows
