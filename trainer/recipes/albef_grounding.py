"""ALBEF weakly-supervised grounding (docs/downstream.md, "ALBEF grounding"): `stage: finetune`, `model.arch:
albef`, `tasks: {grounding: 1}`, as ALBEF's `Grounding.py` on RefCOCO+. Training is retrieval fine-tuning
(trainer/recipes/albef_retrieval.py's step and model) on the (referring expression, picture) pairs of RE task
folders joined to picture shards, the picture's id as the image index: no box is ever seen. Scoring takes
each expression's Grad-CAM over its picture from the ITM head at fusion layer `finetune.gradcam_layer`
(trainer/grounding.py), picks the candidate box (the example's `boxes`) the map covers best, and counts it
right at IoU >= 0.5 with the referred box.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from data.collate_albef import collate_albef_grounding
from data.loader import add_counts
from trainer import downstream_metrics as m
from trainer.downstream_eval import SplitScores, example_outputs
from trainer.grounding import grounded_box, itm_gradcam
from trainer.models.albef_finetune_load import load_for_evaluation
from trainer.recipes.albef import AlbefRecipe
from trainer.recipes.albef_classify import PictureTaskFolders
from trainer.recipes.albef_retrieval import AlbefRetrievalRecipe

TASK = "grounding"
NO_BOXES = "no_candidate_boxes"
"""Skip reason of a held-out example without `boxes`: there is nothing to pick from."""


class AlbefGroundingRecipe(PictureTaskFolders, AlbefRetrievalRecipe):
    """The `grounding` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    tasks = (TASK,)
    task = TASK
    folder_task = "re"
    predictions_task = "re"  # RE's predictions file: id, picked box, its IoU
    ramp_alpha = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.init_folders()

    @classmethod
    def check_config(cls, cfg) -> None:
        AlbefRecipe.check_config(cfg)
        cls.check_task_folders(cfg)
        layers = cfg.model.fusion_layers
        if not 0 <= cfg.finetune.gradcam_layer < layers:
            raise ValueError(f"finetune.gradcam_layer={cfg.finetune.gradcam_layer} must name one of the model's "
                             f"{layers} fusion layers (0-{layers - 1}; ALBEF-base: 2, its block 8)")

    def collate(self, task: str, tok, train: bool = True):
        d = self.cfg.data
        return functools.partial(collate_albef_grounding, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 train=train)

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_work

        return albef_work(batch, self.cfg.model, mlm=False)

    # ------------------------------------------------------------------ scoring
    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]) -> SplitScores:
        """Collective. Accuracy (IoU >= 0.5 of the picked box), what picking a candidate at random scores
        (`acc_chance`), and the picked boxes."""
        usable = [r for r in examples if "boxes" in r]
        if len(usable) < len(examples):
            add_counts(skipped, {NO_BOXES: len(examples) - len(usable)})
        predict = functools.partial(itm_gradcam, layer=self.cfg.finetune.gradcam_layer)
        cams = example_outputs(engine, self.collate(TASK, tok, train=False), predict, usable, self.store, info,
                               self.cfg.finetune.eval_batch_size, skipped)
        kept = sorted(cams)
        used = [usable[i] for i in kept]
        boxes = [grounded_box(torch.from_numpy(cams[i]).reshape(-1), usable[i]) for i in kept]
        gold = [r["box"] for r in used]
        metrics = {}
        if used:
            metrics["acc"] = m.re_accuracy(boxes, gold, strict=False)
            metrics["acc_chance"] = float(np.mean([np.mean([m.iou_xywh(b, r["box"]) >= 0.5 for b in r["boxes"]])
                                                   for r in used]))
        return SplitScores(metrics, {"ids": [r["id"] for r in used], "boxes": boxes, "gold": gold})

    def evaluation_model(self, checkpoint: str, info):
        """A grounding run, or any ALBEF retrieval or pretraining checkpoint (its MLM head dropped)."""
        return load_for_evaluation(self.checkpoint_model(), checkpoint, info.device, self.cfg.precision.torch_dtype)

