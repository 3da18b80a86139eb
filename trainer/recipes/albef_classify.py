"""The fine-tuning recipe ALBEF's task-folder tasks share (docs/downstream.md, "ALBEF visual entailment", "ALBEF
NLVR2", "ALBEF VQA"): task folders joined by image id to picture shards (`finetune.features`), a model whose
momentum copy (the whole model, EMA once per step) gives the distillation targets, and per example
`(1 - alpha) * CE + alpha * soft-CE(teacher)`: for the classifiers on `cls_head` over the fused [CLS]. A task's
recipe (trainer/recipes/albef_ve.py, albef_nlvr2.py, albef_vqa.py) says its model, pictures per example,
batches, loss, scoring and how a checkpoint's weights fit its model.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from data.shards import PIXEL_FORMAT
from data.tasks.features import PictureStore
from trainer.downstream_eval import example_outputs
from trainer.models.albef_classifier import PREDICT_TASK, AlbefClassifier, MomentumCopy
from trainer.models.albef_finetune_load import Adapt, load_for_evaluation, load_into, read_into
from trainer.models.config import AlbefConfig
from trainer.objectives.albef import alpha_at, distilled_classification_loss
from trainer.objectives.base import TaskResult
from trainer.recipes import task_data
from trainer.recipes.albef import check_picture_size, vit_blocks
from trainer.recipes.albef_finetune import refuse_pretraining_inits
from trainer.recipes.albef_tasks import teacher_precision
from trainer.recipes.base import Evaluation, Recipe, StepContext, StepPlan

log = logging.getLogger("vlpt")
NEW = ("cls_head.",)
"""The classifiers' head a pretraining checkpoint does not have: it keeps its (PyTorch default) initialisation."""


class PictureTaskFolders:
    """The data side of ALBEF's task-folder recipes (these, and grounding's): finetune.train / finetune.val task
    folders joined by image id to the picture shards of finetune.features, the training loader at its resumed
    position, held-out splits, and the distillation weight's ramp over the first epoch where the task has one."""

    task: str
    folder_task: Optional[str] = None
    """The kind of task folder read, where it is not `task` (grounding reads RE folders)."""
    predictions_task: Optional[str] = None
    """The predictions file `vlpt evaluate` writes, where it is not `task`'s."""
    ramp_alpha = False
    """Distillation weight ramped from 0 over the first epoch (ALBEF's `warm_up`)."""

    def init_folders(self) -> None:
        self.train_folder = self.val_folder = None
        self.store: Optional[PictureStore] = None
        self.alpha_warmup = 0

    @classmethod
    def check_task_folders(cls, cfg) -> None:
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

    def check_data(self, tok) -> None:
        from trainer.run_setup import check_vocab_sizes

        check_vocab_sizes(self.cfg, tok)
        f, d = self.cfg.finetune, self.cfg.data
        self.train_folder, self.val_folder = task_data.read_folders(self.cfg, self.folder_task or self.task)
        self.store = PictureStore(f.features, d.decode_limits(self.cfg.precision.dtype), f.cache_images,
                                  d.allow_outside_shards)
        task_data.keep_known((self.train_folder, self.val_folder), self.store, self.cfg)

    def report_data(self, tok) -> None:
        task_data.report(self.task, (self.train_folder, self.val_folder), self.store)

    def train_loaders(self, tok, layout, rank: int, positions: dict) -> dict:
        items = self.train_folder.examples if self.train_folder is not None else []
        return task_data.task_loader(self.cfg, self.task, self.train_folder, items, self.store,
                                     self.collate(self.task, tok), layout, rank, positions)

    def on_loaders(self, loaders: dict, layout) -> None:
        if self.ramp_alpha:  # one epoch of the task folder unless model.alpha_warmup_steps says
            warmup = self.cfg.model.alpha_warmup_steps
            examples = len(self.train_folder.examples) if self.train_folder is not None else 0
            self.alpha_warmup = -(-examples // layout.global_batch_size) if warmup is None else warmup

    def val_splits(self, tok, skipped: dict[str, int]) -> dict:
        return {self.task: (self.task, self.val_folder.examples)} if self.val_folder is not None else {}

    def validate(self, engine, tok, splits: dict, info, skipped: dict[str, int]) -> dict[str, float]:
        """Collective. The task's `score` metrics of each held-out split, as `val/<key>_<name>`."""
        metrics: dict[str, float] = {}
        for key, (_, examples) in splits.items():
            found = self.score(engine, tok, examples, info, skipped)
            metrics.update({f"val/{key}_{name}": value for name, value in found.metrics.items()})
        return metrics

    @classmethod
    def evaluation_config(cls, cfg, split: Optional[str]):
        return task_data.evaluation_config(cfg, split)

    def evaluation_model(self, checkpoint: str, info):
        """The model at `checkpoint`, loaded by the task's rules, on the device in eval mode."""
        raise NotImplementedError

    def evaluate(self, checkpoint: str, tok, info) -> Evaluation:
        """The weights at `checkpoint` scored on finetune.val (metrics and the predictions file's payload)."""
        model = self.evaluation_model(checkpoint, info)
        skipped: dict[str, int] = {}
        examples = self.val_folder.examples
        found = self.score(model, tok, examples, info, skipped)
        return Evaluation(self.predictions_task or self.task, self.cfg.finetune.val, len(examples), found.metrics,
                          found.predictions, {**self.val_folder.skipped, **skipped})


class AlbefClassifierRecipe(PictureTaskFolders, Recipe):
    """Subclasses set the task and the class attributes below, `collate` and `score`."""

    arch = "albef"
    stage = "finetune"
    model_config = AlbefConfig
    shard_format = PIXEL_FORMAT
    num_classes: int
    images = 1
    """Pictures per example."""
    dropped: tuple[str, ...]
    """Prefixes of a source checkpoint the task's model has no place for (dropped on load)."""
    new_heads = NEW
    """Prefixes a pretraining checkpoint does not have (kept as initialised when the source lacks them)."""
    missing_head_hint = ""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.init_folders()
        self.init_teacher: Optional[dict] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_task_folders(cfg)

    def collate(self, task: str, tok, train: bool = True) -> Callable:
        raise NotImplementedError

    # ------------------------------------------------------------------ model
    def checkpoint_model(self) -> AlbefClassifier:
        return AlbefClassifier(self.cfg.model, self.num_classes, self.images)

    def adapt(self) -> Optional[Adapt]:
        """How a source checkpoint's student and teacher are fitted to the task's model before loading."""
        return None

    def build_model(self) -> AlbefClassifier:
        model = self.checkpoint_model()
        source = self.cfg.finetune.init_from
        if source:
            loaded = read_into(model, source, "finetune.init_from", adapt=self.adapt(), new=self.new_heads,
                               dropped=self.dropped)
            self.init_teacher = loaded.teacher
            heads = ", ".join(p.rstrip(".") for p in self.new_heads)  # "cls_head"
            head = "loaded" if any(k.startswith(self.new_heads) for k in loaded.student_keys) else "new"
            log.info("initialised from %s: %d tensors; %s; dropped: %s; teacher: %s", loaded.where,
                     len(loaded.student_keys), f"{heads}.*: {head}" if heads else "no new head",
                     self._prefixes(loaded.dropped),
                     (f"loaded, its {heads} a copy of the student's" if heads else "loaded") if self.init_teacher
                     else "a copy of the student")
        return model

    def attach(self, model, layout, device) -> None:
        self.teacher = MomentumCopy(model)  # a new head: a copy of the student's, as ALBEF's copy_params
        if self.init_teacher is not None:
            named = {k.removeprefix("model."): v for k, v in self.init_teacher.items()}  # a fine-tuned run's teacher.pt
            parts = {k: v for k, v in named.items() if k.startswith(self.teacher.parts)}
            what = f"finetune.init_from={self.cfg.finetune.init_from} (teacher.pt)"
            adapt = self.adapt()
            load_into(self.teacher.model, adapt(parts, what) if adapt else parts, what, new=self.new_heads,
                      dropped=self.dropped)
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
        teacher = self.teacher
        alpha = alpha_at(self.cfg.model.alpha, ctx.step, self.alpha_warmup)
        if not ctx.after_skip:
            teacher.update(engine.module)

        def forward_args(i: int, batch: dict) -> tuple:
            with teacher_precision(ctx.device, self.cfg.precision.dtype):
                logits_m = teacher.logits(batch)  # [b, C]
            return self.losses, logits_m, alpha

        return StepPlan(forward_args)

    @staticmethod
    def losses(model, batch: dict, logits_m: torch.Tensor, alpha: float) -> TaskResult:
        """The micro-batch's summed loss against the teacher's `logits_m` (run inside the engine's module)."""
        return classifier_losses(model, batch, logits_m, alpha)

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_classifier_work

        return albef_classifier_work(batch, self.cfg.model, self.images)

    # ------------------------------------------------------------------ scoring
    def outputs(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]) -> dict:
        """Collective. Example index -> its logits in the model's class order."""
        return example_outputs(engine, self.collate(self.task, tok, train=False), self.predict_task(), examples,
                               self.store, info, self.cfg.finetune.eval_batch_size, skipped)

    def predict_task(self) -> Callable:
        """Scoring: `task(model, batch)` -> [b, C] per-example outputs whose argmax is the prediction."""
        return PREDICT_TASK

    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]):
        raise NotImplementedError

    def evaluation_model(self, checkpoint: str, info):
        return load_for_evaluation(self.checkpoint_model(), checkpoint, info.device, self.cfg.precision.torch_dtype,
                                   self.missing_head_hint, adapt=self.adapt(), dropped=self.dropped)

    def _prefixes(self, keys: list[str]) -> str:
        """The `dropped` prefixes `keys` fell under, for one log line (`text_encoder.cls.*, temp`)."""
        found = {next(p for p in self.dropped if k.startswith(p)) for k in keys}
        return ", ".join(sorted(p + "*" if p.endswith(".") else p for p in found)) or "none"


def classifier_losses(model: AlbefClassifier, batch: dict, logits_m: torch.Tensor, alpha: float) -> TaskResult:
    """Summed distilled loss and correct predictions over the micro-batch's b examples."""
    logits = model.logits(batch)  # [b, C]
    labels = batch["labels"]
    loss = distilled_classification_loss(logits, logits_m, labels, alpha)
    correct = (logits.argmax(-1) == labels).float().sum().detach()
    return TaskResult({"loss": loss}, {"loss": loss.detach(), "acc": correct}, {})
