"""ALBEF visual entailment (docs/downstream.md, "ALBEF visual entailment"): `stage: finetune`, `model.arch:
albef`, `tasks: {ve: 1}`, as ALBEF's `VE.py`. Task folders (`vlpt tasks ve`, the demo's) joined by image
id to picture shards (`finetune.features`); one fusion pass per (picture, hypothesis) and a 3-way `cls_head`
on the fused [CLS], distilled from a momentum copy of the whole model: per example
`(1 - alpha) * CE + alpha * soft-CE(teacher)`, alpha constant (ALBEF: no warm-up for VE).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from data.collate_albef import ALBEF_VE_LABELS, collate_albef_ve
from data.shards import PIXEL_FORMAT
from data.tasks.features import PictureStore
from data.tasks.records import VE_LABELS
from trainer.downstream_eval import classifier_scores, example_outputs
from trainer.models.albef_classifier import PREDICT_TASK, AlbefClassifier, ClassifierTeacher
from trainer.models.albef_finetune_load import load_for_evaluation, load_into, read_into
from trainer.models.config import AlbefConfig
from trainer.objectives.albef import distilled_classification_loss
from trainer.objectives.base import TaskResult
from trainer.recipes import task_data
from trainer.recipes.albef import check_picture_size, vit_blocks
from trainer.recipes.albef_finetune import refuse_pretraining_inits
from trainer.recipes.albef_tasks import teacher_precision
from trainer.recipes.base import Evaluation, Recipe, StepContext, StepPlan

log = logging.getLogger("vlpt")
TASK = "ve"
NOT_IN_VE = ("vision_proj.", "text_proj.", "itm_head.", "temp", "queues.", "text_encoder.cls.")
"""What a pretraining checkpoint holds that ALBEF's VE model has no place for (dropped on load)."""
NEW = ("cls_head.",)
"""The head a pretraining checkpoint does not have: it keeps its (PyTorch default) initialisation."""
TO_UNITER_ORDER = [ALBEF_VE_LABELS.index(name) for name in VE_LABELS]
"""Column of each task-folder label (contradiction, entailment, neutral) among ALBEF's logits."""


class AlbefVeRecipe(Recipe):
    """The `ve` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    arch = "albef"
    stage = "finetune"
    model_config = AlbefConfig
    tasks = (TASK,)
    shard_format = PIXEL_FORMAT

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.train_folder = self.val_folder = None
        self.store: Optional[PictureStore] = None
        self.init_teacher: Optional[dict] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        f = cfg.finetune
        if not f.train and not f.val:
            raise ValueError("stage: finetune needs finetune.train (a task folder) or finetune.val")
        if not f.features:
            raise ValueError("finetune.features: name the picture shard folders that hold the examples' images")
        check_picture_size(cfg)
        refuse_pretraining_inits(cfg)

    @classmethod
    def input_dirs(cls, cfg) -> list:
        from trainer.run_setup import finetune_dirs

        return finetune_dirs(cfg)

    # ------------------------------------------------------------------ data
    def check_data(self, tok) -> None:
        from trainer.run_setup import check_vocab_sizes

        check_vocab_sizes(self.cfg, tok)
        f, d = self.cfg.finetune, self.cfg.data
        self.train_folder, self.val_folder = task_data.read_folders(self.cfg, TASK)
        self.store = PictureStore(f.features, d.decode_limits(self.cfg.precision.dtype), f.cache_images,
                                  d.allow_outside_shards)
        task_data.keep_known((self.train_folder, self.val_folder), self.store, self.cfg)

    def report_data(self, tok) -> None:
        task_data.report(TASK, (self.train_folder, self.val_folder), self.store)

    def train_loaders(self, tok, layout, rank: int, positions: dict) -> dict:
        items = self.train_folder.examples if self.train_folder is not None else []
        return task_data.task_loader(self.cfg, TASK, self.train_folder, items, self.store, self.collate(TASK, tok),
                                     layout, rank, positions)

    def val_splits(self, tok, skipped: dict[str, int]) -> dict:
        return {TASK: (TASK, self.val_folder.examples)} if self.val_folder is not None else {}

    def collate(self, task: str, tok, train: bool = True):
        d = self.cfg.data
        return functools.partial(collate_albef_ve, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 train=train)

    # ------------------------------------------------------------------ model
    def build_model(self) -> AlbefClassifier:
        model = AlbefClassifier(self.cfg.model, len(ALBEF_VE_LABELS))
        source = self.cfg.finetune.init_from
        if source:
            loaded = read_into(model, source, "finetune.init_from", new=NEW, dropped=NOT_IN_VE)
            self.init_teacher = loaded.teacher
            head = "loaded" if any(k.startswith(NEW) for k in loaded.student_keys) else "new"
            log.info("initialised from %s: %d tensors; cls_head.*: %s; dropped: %s; teacher: %s", loaded.where,
                     len(loaded.student_keys), head, _prefixes(loaded.dropped),
                     "loaded, its cls_head a copy of the student's" if self.init_teacher else "a copy of the student")
        return model

    def attach(self, model, layout, device) -> None:
        self.teacher = ClassifierTeacher(model)  # cls_head: a copy of the student's, as ALBEF's copy_params
        if self.init_teacher is not None:
            named = {k.removeprefix("model."): v for k, v in self.init_teacher.items()}  # a VE run's teacher.pt
            parts = {k: v for k, v in named.items() if k.startswith(ClassifierTeacher.PARTS)}
            load_into(self.teacher.model, parts, f"finetune.init_from={self.cfg.finetune.init_from} (teacher.pt)",
                      new=NEW, dropped=NOT_IN_VE)
            self.init_teacher = None
        self.teacher.to(device)

    def replicated(self) -> dict:
        return {"teacher": self.teacher}

    def blocks_to_compile(self, model) -> dict:
        t = self.teacher.model
        return {"ViT blocks": vit_blocks(model.visual_encoder), "text layers": list(model.text_encoder.layer),
                "fusion layers": list(model.text_encoder.fusion),
                "teacher blocks": [*vit_blocks(t.visual_encoder), *t.text_encoder.layer, *t.text_encoder.fusion]}

    # ------------------------------------------------------------------ step
    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        return {"loss": float(batch["n_items"])}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        """The EMA (not right after a skipped step), then per micro-batch the teacher's logits of the same
        augmented pictures: ALBEF updates the teacher after the student's forward, before any weight moves."""
        teacher, alpha = self.teacher, self.cfg.model.alpha
        if not ctx.after_skip:
            teacher.update(engine.module)

        def forward_args(i: int, batch: dict) -> tuple:
            with teacher_precision(ctx.device, self.cfg.precision.dtype):
                logits_m = teacher.logits(batch)  # [b, 3]
            return ve_losses, logits_m, alpha

        return StepPlan(forward_args)

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_classifier_work

        return albef_classifier_work(batch, self.cfg.model)

    # ------------------------------------------------------------------ scoring
    def validate(self, engine, tok, splits: dict, info, skipped: dict[str, int]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, (_, examples) in splits.items():
            found = self.score(engine, tok, examples, info, skipped)
            metrics.update({f"val/{key}_{name}": value for name, value in found.metrics.items()})
        return metrics

    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]):
        """Collective. Accuracy (when labelled) and the predicted label names, in the task folder's terms."""
        out = example_outputs(engine, self.collate(TASK, tok, train=False), PREDICT_TASK, examples, self.store,
                              info, self.cfg.finetune.eval_batch_size, skipped)
        in_folder_order = {i: v.reshape(-1)[TO_UNITER_ORDER] for i, v in out.items()}
        return classifier_scores(TASK, examples, in_folder_order, list(VE_LABELS))

    @classmethod
    def evaluation_config(cls, cfg, split: Optional[str]):
        return task_data.evaluation_config(cfg, split)

    def evaluate(self, checkpoint: str, tok, info) -> Evaluation:
        model = load_for_evaluation(AlbefClassifier(self.cfg.model, len(ALBEF_VE_LABELS)), checkpoint, info.device,
                                    self.cfg.precision.torch_dtype,
                                    " (a VE model needs its cls_head: pass a `vlpt finetune` run on ve)",
                                    dropped=NOT_IN_VE)
        skipped: dict[str, int] = {}
        examples = self.val_folder.examples
        found = self.score(model, tok, examples, info, skipped)
        return Evaluation(TASK, self.cfg.finetune.val, len(examples), found.metrics, found.predictions,
                          {**self.val_folder.skipped, **skipped})


def ve_losses(model: AlbefClassifier, batch: dict, logits_m: torch.Tensor, alpha: float) -> TaskResult:
    """Summed distilled loss and correct predictions over the micro-batch's b examples."""
    logits = model.logits(batch)  # [b, 3]
    labels = batch["labels"]
    loss = distilled_classification_loss(logits, logits_m, labels, alpha)
    correct = (logits.argmax(-1) == labels).float().sum().detach()
    return TaskResult({"loss": loss}, {"loss": loss.detach(), "acc": correct}, {})


def _prefixes(keys: list[str]) -> str:
    """The NOT_IN_VE prefixes `keys` fell under, for one log line (`text_encoder.cls.*, temp`)."""
    found = {next(p for p in NOT_IN_VE if k.startswith(p)) for k in keys}
    return ", ".join(sorted(p + "*" if p.endswith(".") else p for p in found)) or "none"

