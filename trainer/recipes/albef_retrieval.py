"""ALBEF retrieval fine-tuning (docs/downstream.md, "ALBEF retrieval"): `stage: finetune`, `model.arch:
albef`, `tasks: {retrieval: 1}` on picture-caption shards (`data.train`, `data.val`), as ALBEF's
`Retrieval.py` on COCO / Flickr30k.

The step is pretraining's (trainer/recipes/albef.py) with ALBEF's retrieval model: no MLM, the captions
of one image are positives of each other in both ITC directions (in the global batch and in the queue,
which keeps each feature's image index), the temperature is learnt without a clamp, and ITM never
draws a negative from the same image. The student and the teacher with its queues start from
`finetune.init_from` (a vlpt ALBEF pretraining run, or ALBEF's own file); the index queue starts empty.
Validation and `vlpt evaluate`: ITC top-k re-ranked by ITM (trainer/retrieval.py); with no
`finetune.init_from` and no training, that is zero-shot retrieval of the checkpoint evaluated.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import torch

from data.collate_albef import collate_albef_retrieval
from trainer.distributed import all_gather_varying_rows
from trainer.models.albef import Albef, AlbefTeacher
from trainer.models.albef_finetune_load import FRESH, load_for_evaluation, load_into, read_into
from trainer.objectives.albef import alpha_at
from trainer.recipes.albef import AlbefRecipe
from trainer.recipes.albef_finetune import refuse_pretraining_inits, refuse_task_folders
from trainer.recipes.albef_tasks import RetrievalTargets, albef_retrieval_losses, negatives_seed
from trainer.recipes.base import Evaluation, StepContext, StepPlan
from trainer.retrieval import load_retrieval_set, retrieval_scores

log = logging.getLogger("vlpt")
TASK = "retrieval"


class AlbefRetrievalRecipe(AlbefRecipe):
    """The `retrieval` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    stage = "finetune"
    tasks = (TASK,)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.init_teacher: Optional[dict] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        refuse_task_folders(cfg, "ALBEF retrieval")
        refuse_pretraining_inits(cfg)

    def build_model(self) -> Albef:
        """ALBEF's retrieval model (no MLM head), loaded from finetune.init_from when set."""
        model = self.checkpoint_model()
        source = self.cfg.finetune.init_from
        if source:
            loaded = read_into(model, source, "finetune.init_from")
            self.init_teacher = loaded.teacher
            log.info("initialised from %s: %d tensors; dropped: %s; teacher and queues: %s", loaded.where,
                     len(loaded.student_keys), "text_encoder.cls.* (MLM head)" if loaded.dropped else "none",
                     "loaded (index queue fresh)" if self.init_teacher else "a copy of the student, fresh queues")
        return model

    def checkpoint_model(self) -> Albef:
        return Albef(self.cfg.model, mlm_head=False)

    def collate(self, task: str, tok):
        d = self.cfg.data
        return functools.partial(collate_albef_retrieval, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len)

    def attach(self, model, layout, device) -> None:
        self.check_layout(self.cfg, layout)
        self.teacher = AlbefTeacher(model, image_index_queue=True)
        if self.init_teacher is not None:
            load_into(self.teacher, self.init_teacher, f"finetune.init_from={self.cfg.finetune.init_from} "
                      "(teacher.pt)", fresh=FRESH)
            self.init_teacher = None
        self.teacher.to(device)

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        rows = float(batch["n_items"])
        return {"itc": rows, "itm": 3.0 * rows}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        """The teacher's features and image indices of the whole global batch (after the EMA), then each
        micro-batch's loss against them and the queue; the queue takes the batch after the step."""
        teacher = self.teacher
        _, image_all, text_all, offsets = self.teacher_features(engine, batches, ctx)
        local_index = torch.cat([b["image_index"] for b in batches]).to(image_all.device)  # [rows]
        index_all, _ = all_gather_varying_rows(local_index)  # [B], rows in stream order
        columns = torch.cat([index_all, teacher.queues.idx_queue])  # [B + Q]
        alpha = alpha_at(self.cfg.model.alpha, ctx.step, self.alpha_warmup)

        def forward_args(i: int, batch: dict) -> tuple:
            seed = negatives_seed(ctx.seed, ctx.step, int(batch["stream"]))
            return albef_retrieval_losses, RetrievalTargets(image_all, text_all, teacher.queues.image_queue,
                                                            teacher.queues.text_queue, columns, offsets[i], alpha,
                                                            seed)

        def finish(means: dict[str, float], skipped: bool) -> None:
            means["loss"] = means["itc"] + means["itm"]
            if not skipped:  # a skipped step leaves the queue as it was, like the weights
                teacher.queues.push(image_all, text_all, index_all)

        return StepPlan(forward_args, finish)

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_work

        return albef_work(batch, self.cfg.model, mlm=False)  # no masked-caption passes

    # ------------------------------------------------------------------ vlpt evaluate
    @classmethod
    def evaluation_config(cls, cfg, split: Optional[str]):
        """Scores `split` (default data.val); data.train is pointed at it too, as nothing is trained and
        every folder the config names must exist."""
        split = split or cfg.data.val
        if not split:
            raise ValueError("vlpt evaluate: give --split <picture shard folder> or set data.val")
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=split, val=split),
                                   finetune=dataclasses.replace(cfg.finetune, init_from=None))

    def evaluate(self, checkpoint: str, tok, info) -> Evaluation:
        """The weights at `checkpoint` (a fine-tuned run, or a pretraining one: zero-shot) on the held-out
        split: ALBEF's score matrices of both directions and their recalls."""
        model = load_for_evaluation(self.checkpoint_model(), checkpoint, info.device,
                                    self.cfg.precision.torch_dtype)
        skipped: dict[str, int] = {}
        (_, data), = self.val_splits(tok, skipped).values()
        d = self.cfg.data
        found = retrieval_scores(model, data, d.albef.pixels, k=self.cfg.model.k_test, batch_size=d.val_batch_size,
                                 device=info.device, rank=info.rank, world=info.world_size)
        predictions = {"scores": found.t2i.numpy(), "scores_i2t": found.i2t.numpy(), "text_ids": data.text_ids,
                       "image_ids": data.image_ids, "recalls": found.metrics, "scores_dtype": "float32"}
        return Evaluation(TASK, d.val, len(data.text_ids), found.metrics, predictions, skipped)

    def read_val_split(self, shards: list[str], tok, skipped: dict[str, int]):
        d = self.cfg.data
        return load_retrieval_set(shards, tok, d.max_txt_len, self.cfg.storage.s3, d.decode_limits(), skipped=skipped,
                                  downstream=True)
