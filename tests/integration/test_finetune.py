"""`vlpt finetune` / `vlpt evaluate` on tiny shapes (docs/downstream.md): a UNITER-format checkpoint,
imported with `vlpt convert import`, fine-tunes on every task with the documented missing/unexpected
keys only; `vlpt evaluate` writes each task's predictions file, which an independent scorer here
reads back to the same metric; a resumed fine-tuning run is exact."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_MODEL

pytestmark = pytest.mark.slow

TASKS = ("vqa", "ve", "retrieval", "nlvr2", "re", "vcr")
NEW_HEAD = {"vqa": {"vqa_output"}, "ve": {"vqa_output"}, "retrieval": {"rank_output"},
            "nlvr2": {"nlvr2_output", "attn1", "attn2", "fc", "attn_pool"}, "re": {"re_output"},
            "vcr": {"vcr_output"}}
PRETRAINING_HEADS = {"cls", "feat_regress", "region_classifier", "itm_output"}


@pytest.fixture(scope="module")
def tasks_dir(demo_data):
    from data.tasks.demo import write_demo_tasks

    out = demo_data / "tasks"
    if not (out / "vcr" / "val" / "manifest.json").is_file():
        write_demo_tasks(out, seed=0, n_train_scenes=240, n_val_scenes=40, img_dim=16, noise_std=0.5,
                         region_dirs={"train": demo_data / "train", "val": demo_data / "val"})
    return out


@pytest.fixture(scope="module")
def uniter_checkpoint(tmp_path_factory):
    """A tiny pretrained UNITER saved with UNITER's own key names, then `vlpt convert import`ed."""
    from trainer.models.config import ModelConfig
    from trainer.models.convert import export_uniter_state_dict
    from trainer.models.pretrain import UniterForPretraining
    from vlpt.cli import main

    root = tmp_path_factory.mktemp("uniter_ckpt")
    torch.manual_seed(0)
    model = UniterForPretraining(ModelConfig(**TINY_MODEL, vocab_size=188, img_dim=16, img_label_dim=9))
    torch.save(export_uniter_state_dict(model.state_dict()), root / "model_step_100.pt")
    assert main(["convert", "import", "--src", str(root / "model_step_100.pt"), "--dst", str(root / "ours.pt")]) == 0
    return root / "ours.pt"


def write_config(tmp_path: Path, demo_data: Path, tasks_dir: Path, task: str, init_from, steps: int = 2) -> Path:
    vocab = str(REPO / "data/vocab/demo-vocab.txt")
    cfg = {"stage": "finetune", "tasks": {task: 1.0},
           "model": {**TINY_MODEL, "vocab_size": 188, "img_dim": 16, "img_label_dim": 9,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
           "data": {"tokenizer": {"path": vocab, "lowercase": False}, "micro_batch_size": 8, "max_txt_len": 40},
           "finetune": {"train": str(tasks_dir / task / "train"), "val": str(tasks_dir / task / "val"),
                        "features": [str(demo_data / "train"), str(demo_data / "val")],
                        "init_from": str(init_from) if init_from else None, "eval_batch_size": 64},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "train": {"run_dir": str(tmp_path / f"run-{task}"), "max_steps": steps, "log_every": 1,
                     "progress": False, "seed": 3},
           "tracking": {"enabled": False}}
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo_data, tasks_dir, uniter_checkpoint, process_group):
    """Each task fine-tuned 2 steps from the imported UNITER checkpoint: task -> (config path, summary)."""
    from trainer.config import load_config
    from trainer.run import pretrain

    root = tmp_path_factory.mktemp("finetune")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # as a launcher sets it; the DeepSpeed engine asserts it
        for task in TASKS:
            path = write_config(root, demo_data, tasks_dir, task, uniter_checkpoint)
            runs[task] = (path, pretrain(load_config(str(path))))
    return runs


@pytest.mark.parametrize("task", TASKS)
def test_uniter_checkpoint_loads_with_the_documented_keys_and_fine_tunes(task, finetuned, uniter_checkpoint):
    from trainer.models.downstream import HeadConfig, UniterForFinetuning
    from trainer.models.downstream_load import load_pretrained
    from trainer.models.config import ModelConfig
    from trainer.models.pretrained_weights import read_weights

    sd, _ = read_weights(str(uniter_checkpoint), "test")
    head = HeadConfig(task=task, num_answers=22 if task == "vqa" else 3)
    model = UniterForFinetuning(ModelConfig(**TINY_MODEL, vocab_size=188, img_dim=16, img_label_dim=9), head)
    report = load_pretrained(model, sd, head)
    missing = {k.split(".")[0] for k in report.missing}
    unexpected = {k.split(".")[0] for k in report.unexpected}
    assert missing == NEW_HEAD[task]
    assert unexpected == PRETRAINING_HEADS - ({"itm_output"} if task == "retrieval" else set())
    if task == "retrieval":  # the rank head starts as a copy of ITM's positive row
        assert any(c.startswith("rank_output") for c in report.copied)
        assert torch.equal(model.rank_output.weight, sd["itm_output.weight"][1:2])
    summary = finetuned[task][1]
    assert summary["steps"] == 2 and summary["stage"] == "finetune"
    assert any(k.startswith(f"val/{task}_") for k in summary)


def _examples(path: Path) -> dict[str, dict]:
    with open(path / "examples.jsonl") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def _iou(a, b) -> float:
    """The pixel IoU of docs/downstream.md, written out again."""
    iw = min(a[0] + a[2] - 1, b[0] + b[2] - 1) - max(a[0], b[0]) + 1
    ih = min(a[1] + a[3] - 1, b[1] + b[3] - 1) - max(a[1], b[1]) + 1
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def score_files(task: str, out: Path, val: Path) -> dict[str, float]:
    """An independent scorer of each task's predictions file against the held-out examples."""
    ex = _examples(val)
    if task == "vqa":
        labels = json.loads((val / "manifest.json").read_text())["labels"]
        preds = json.loads((out / "predictions.json").read_text())
        scores = [dict(zip(ex[p["question_id"]]["labels"], ex[p["question_id"]]["scores"]))
                  .get(labels.index(p["answer"]), 0.0) for p in preds]
        return {"score": sum(scores) / len(scores)}
    if task == "ve":
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        names = ["contradiction", "entailment", "neutral"]
        return {"acc": np.mean([names[ex[r["pair_id"]]["label"]] == r["label"] for r in rows])}
    if task == "nlvr2":
        rows = [line.strip().split(",") for line in open(out / "predictions.csv") if line.strip()]
        return {"acc": np.mean([(ident_pred == "True") == bool(ex[ident]["label"]) for ident, ident_pred in rows])}
    if task == "re":
        preds = json.loads((out / "predictions.json").read_text())
        return {"acc": np.mean([_iou(p["box"], ex[p["id"]]["box"]) > 0.5 for p in preds])}
    if task == "vcr":
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        qa = [np.argmax([float(r[f"answer_{i}"]) for i in range(4)]) == ex[r["annot_id"]]["answer_label"]
              for r in rows]
        return {"qa_acc": float(np.mean(qa))}
    scores = np.load(out / "scores.npy").astype(np.float32)  # retrieval: [n_txt, n_img]
    ids = json.loads((out / "ids.json").read_text())
    gt = np.array([ids["images"].index(ex[t]["image_id"]) for t in ids["texts"]])
    rank_of_gt = [(row > row[g]).sum() for row, g in zip(scores, gt)]
    return {"img_r1": float(np.mean(np.array(rank_of_gt) < 1)), "img_r5": float(np.mean(np.array(rank_of_gt) < 5))}


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_writes_predictions_an_independent_scorer_agrees_with(task, finetuned, tmp_path):
    from trainer.config import load_config
    from trainer.evaluate import evaluate

    path, _ = finetuned[task]
    cfg = load_config(str(path))
    result = evaluate(cfg, cfg.train.run_dir, out=str(tmp_path / "eval"))
    assert result["files"] and all(Path(f).is_file() for f in result["files"])
    mine = score_files(task, tmp_path / "eval", Path(cfg.finetune.val))
    for name, value in mine.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["metrics"] == pytest.approx(result["metrics"])


def test_resumed_finetuning_is_exact(tmp_path, demo_data, tasks_dir, uniter_checkpoint, process_group, monkeypatch):
    from trainer.config import load_config
    from trainer.models.pretrained_weights import read_weights
    from trainer.run import pretrain

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_config(tmp_path / "a", demo_data, tasks_dir, "nlvr2", uniter_checkpoint, steps=4)
    halves = write_config(tmp_path / "b", demo_data, tasks_dir, "nlvr2", uniter_checkpoint, steps=4)
    monkeypatch.setenv("LOCAL_RANK", "0")
    pretrain(load_config(str(straight)))
    pretrain(load_config(str(halves), ["--train.stop_after_steps=2"]))
    pretrain(load_config(str(halves)))
    a, _ = read_weights(str(tmp_path / "a" / "run-nlvr2"), "a")
    b, _ = read_weights(str(tmp_path / "b" / "run-nlvr2"), "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["vqa", "re"])
def test_finetuning_runs_under_zero2_bf16(task, tmp_path, demo_data, tasks_dir, uniter_checkpoint, process_group,
                                          monkeypatch):
    from trainer.config import load_config
    from tests.conftest import read_metrics
    from trainer.run import pretrain

    monkeypatch.setenv("LOCAL_RANK", "0")
    path = write_config(tmp_path, demo_data, tasks_dir, task, uniter_checkpoint, steps=3)
    summary = pretrain(load_config(str(path), ["--precision.dtype=bf16", "--parallel.zero_stage=2"]))
    losses = [r[f"{task}_loss"] for r in read_metrics(tmp_path / f"run-{task}") if f"{task}_loss" in r]
    assert summary["steps"] == 3 and len(losses) == 3 and all(np.isfinite(losses))


def test_retrieval_with_hard_negatives_trains(tmp_path, demo_data, tasks_dir, uniter_checkpoint, process_group,
                                              monkeypatch):
    from tests.conftest import read_metrics
    from trainer.config import load_config
    from trainer.run import pretrain

    monkeypatch.setenv("LOCAL_RANK", "0")
    path = write_config(tmp_path, demo_data, tasks_dir, "retrieval", uniter_checkpoint, steps=2)
    summary = pretrain(load_config(str(path), ["--finetune.hard_negatives=3", "--finetune.hard_candidates=7"]))
    records = [r for r in read_metrics(tmp_path / "run-retrieval") if "retrieval_loss" in r]
    assert summary["steps"] == 2 and len(records) == 2 and all(np.isfinite(r["retrieval_loss"]) for r in records)
    assert "val/retrieval_img_r1" in summary


@pytest.mark.parametrize("task, labels", [("vqa", ("labels", "scores")), ("vcr", ("answer_label", "rationale_label")),
                                          ("nlvr2", ("label",))])
def test_evaluate_writes_predictions_of_an_unlabelled_test_split(task, labels, finetuned, tmp_path):
    from data.tasks.folder import read_task_folder, write_task_folder
    from trainer.config import load_config
    from trainer.evaluate import evaluate

    path, _ = finetuned[task]
    cfg = load_config(str(path))
    val = read_task_folder(cfg.finetune.val)
    test = [{k: v for k, v in r.items() if k not in labels} for r in val.examples]
    write_task_folder(tmp_path / "test", task, "test", test, labels=val.labels)
    result = evaluate(cfg, cfg.train.run_dir, split=str(tmp_path / "test"), out=str(tmp_path / "eval"))
    assert result["metrics"] == {} and result["files"]
    from trainer.predictions import read_predictions

    assert len(read_predictions(task, str(tmp_path / "eval"))["ids"]) == len(test)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_a_finetuned_model_exports_with_uniter_names_and_loads_back(task, finetuned, tmp_path):
    from trainer.config import load_config
    from trainer.models.config import ModelConfig
    from trainer.models.downstream import HeadConfig, UniterForFinetuning
    from vlpt.cli import main

    cfg = load_config(str(finetuned[task][0]))
    assert main(["convert", "export", "--src", cfg.train.run_dir, "--dst", str(tmp_path / "model.pt")]) == 0
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    model = UniterForFinetuning(ModelConfig(**TINY_MODEL, vocab_size=188, img_dim=16, img_label_dim=9),
                                HeadConfig(task=task, num_answers=22 if task == "vqa" else 3))
    model.load_state_dict(sd, strict=True)  # UNITER's key set of a fine-tuned model: backbone + head
    assert any(k.startswith(("vqa_output.", "nlvr2_output.")) for k in sd)


def test_validation_style_retrieval_scores_the_own_image_and_the_next_ones(finetuned, tmp_path):
    """UNITER's validation style: column 0 is the caption's image, then the next images of the list; its R@K
    equals the full matrix's read over those columns."""
    from trainer.config import load_config
    from trainer.downstream_eval import score_split, validation_recalls
    from trainer.distributed import DistInfo
    from trainer.recipes import recipe_class
    from trainer.run_setup import run_tokenizer

    path, _ = finetuned["retrieval"]
    cfg = load_config(str(path), ["--finetune.retrieval_eval=validation", "--finetune.retrieval_eval_images=5"])
    recipe = recipe_class("uniter", "finetune")(cfg)
    tok = run_tokenizer(cfg)
    recipe.check_data(tok)
    model = recipe.load_finetuned(cfg.train.run_dir)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    examples = recipe.val_folder.examples
    val = score_split(model, recipe, tok, examples, info, {})
    whole = score_split(model, recipe, tok, examples, info, {}, full=True)
    matrix, images = np.asarray(whole.predictions["scores"]), whole.predictions["image_ids"]
    gt = np.array([images.index(r["image_id"]) for r in examples])
    picked = np.stack([row[[(g + d) % len(images) for d in range(5)]] for row, g in zip(matrix, gt)])
    assert set(val.metrics) == {"img_r1", "img_r5", "img_r10", "img_r_mean"}
    assert val.metrics == pytest.approx(validation_recalls(picked), abs=1e-6)
    assert val.metrics["img_r5"] == 1.0  # 5 candidates: the right one is always within the top 5
