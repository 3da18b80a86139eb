"""UNITER fine-tuning (docs/downstream.md): one downstream task per run (`tasks: {vqa: 1}`), its head on
the pretrained encoder, task folders joined to region features by image id.

The run machinery is pretraining's (trainer/run.py); this recipe supplies the data (task folders, a
FeatureStore, DownstreamLoaders), the model (UniterForFinetuning loaded by the rules of
trainer/models/downstream_load.py), the step's loss normalisation and the validation metrics.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional

from data.shards import FORMAT
from data.tasks import collate as task_collate
from data.tasks.collate_hard import CandidatePool, collate_retrieval_hard
from data.tasks.features import FeatureStore
from data.tasks.folder import TaskFolder
from data.tasks.records import TASKS, VE_LABELS
from trainer.config_files import ConfigError
from trainer.downstream_eval import score_split
from trainer.models.config import ModelConfig
from trainer.models.downstream import HeadConfig, UniterForFinetuning
from trainer.models.downstream_load import load_pretrained
from trainer.models.pretrained_weights import read_weights
from trainer.objectives.downstream import retrieval_hard_train, training_function
from trainer.recipes import register, task_data
from trainer.recipes.base import Evaluation, Recipe, StepContext, StepPlan

log = logging.getLogger("vlpt")


def expand_vcr(examples: list[dict]) -> list[dict]:
    """VCR trains on Q->A and QA->R items alike, bucketed together: one item of each per question."""
    return [{**r, "mode": mode} for r in examples for mode in ("qa", "qar")]


@register
class UniterFinetuneRecipe(Recipe):
    arch = "uniter"
    stage = "finetune"
    model_config = ModelConfig
    tasks = TASKS
    shard_format = FORMAT

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.task = next(iter(cfg.tasks))
        self.train_folder: Optional[TaskFolder] = None
        self.val_folder: Optional[TaskFolder] = None
        self.store: Optional[FeatureStore] = None
        self.labels: Optional[list[str]] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        if len(cfg.tasks) != 1:
            raise ValueError(f"stage: finetune trains one task; tasks: has {sorted(cfg.tasks)}; keep one of "
                             f"{', '.join(TASKS)}")
        f = cfg.finetune
        if not f.train and not f.val:
            raise ValueError("stage: finetune needs finetune.train (a task folder) or finetune.val")
        if not f.features:
            raise ValueError("finetune.features: name the region shard folders that hold the examples' images")
        if next(iter(cfg.tasks)) == "vcr" and cfg.model.type_vocab_size != 2:
            raise ValueError("VCR extends the 2-row type table of a pretrained UNITER to 4 rows itself; leave "
                             "model.type_vocab_size at 2")

    # ------------------------------------------------------------------ data
    def check_data(self, tok) -> None:
        from trainer.run_setup import check_vocab_sizes

        check_vocab_sizes(self.cfg, tok)
        f, d = self.cfg.finetune, self.cfg.data
        self.train_folder, self.val_folder = task_data.read_folders(self.cfg, self.task)
        self.labels = self._answer_labels()
        self.store = FeatureStore(f.features, self.cfg.model.img_dim, d.decode_limits(self.cfg.precision.dtype),
                                  f.cache_images, d.allow_outside_shards)
        task_data.keep_known((self.train_folder, self.val_folder), self.store, self.cfg)

    def _answer_labels(self) -> Optional[list[str]]:
        if self.task != "vqa":
            return list(VE_LABELS) if self.task == "ve" else None
        return task_data.answer_vocabulary((self.train_folder, self.val_folder))

    def report_data(self, tok) -> None:
        task_data.report(self.task, (self.train_folder, self.val_folder), self.store)

    def train_items(self) -> list[dict]:
        examples = self.train_folder.examples
        return expand_vcr(examples) if self.task == "vcr" else examples

    def train_loaders(self, tok, layout, rank: int, positions: dict) -> dict:
        items = self.train_items() if self.train_folder is not None else []
        return task_data.task_loader(self.cfg, self.task, self.train_folder, items, self.store,
                                     self.collate(self.task, tok), layout, rank, positions)

    def val_splits(self, tok, skipped: dict[str, int]) -> dict[str, tuple[str, Any]]:
        return {self.task: (self.task, self.val_folder.examples)} if self.val_folder is not None else {}

    # ------------------------------------------------------------------ model
    def head_config(self) -> HeadConfig:
        f = self.cfg.finetune
        num_answers = len(self.labels) if self.labels else 3
        return HeadConfig(task=self.task, num_answers=num_answers, nlvr2_variant=f.nlvr2_variant,
                          re_mlp=f.re_mlp, re_loss=f.re_loss, vcr_extra_words=f.vcr_extra_words)

    def build_model(self) -> UniterForFinetuning:
        model = UniterForFinetuning(self.cfg.model, self.head_config())
        source = self.cfg.finetune.init_from
        if source:
            sd, where = read_weights(source, "finetune.init_from")
            report = load_pretrained(model, sd, model.head)
            log.info("initialised from %s: %d tensors; new (missing): %s; dropped (unexpected): %s; copied: %s",
                     where, len(sd), _prefixes(report.missing), _prefixes(report.unexpected),
                     ", ".join(report.copied) or "none")
        return model

    def collate(self, task: str, tok):
        d, f = self.cfg.data, self.cfg.finetune
        common = {"tok": tok, "max_txt_len": d.max_txt_len}
        if task == "vqa":
            return functools.partial(task_collate.collate_vqa, num_answers=len(self.labels), **common)
        if task == "ve":
            return functools.partial(task_collate.collate_ve, **common)
        if task == "retrieval" and f.hard_negatives:
            pool = CandidatePool(self.train_folder.examples, self.store)
            return functools.partial(collate_retrieval_hard, pool=pool, candidates=f.hard_candidates,
                                     hard_size=f.hard_negatives, **common)
        if task == "retrieval":
            return functools.partial(task_collate.collate_retrieval_train, negative_size=f.negative_size, **common)
        if task == "nlvr2":
            return functools.partial(task_collate.collate_nlvr2, variant=f.nlvr2_variant, **common)
        if task == "re":
            return functools.partial(task_collate.collate_re, **common)
        return functools.partial(task_collate.collate_vcr, **common)

    def collate_pairs(self, tok):
        """Retrieval scoring: (caption, image) pairs, one row each."""
        return functools.partial(task_collate.collate_retrieval_pairs, tok=tok, max_txt_len=self.cfg.data.max_txt_len)

    def blocks_to_compile(self, model) -> dict:
        return {"encoder layers": list(model.uniter.encoder.layer)}

    def lr_multipliers(self) -> dict[str, float]:
        """finetune.lr_mul on every parameter of the task head (UNITER's `lr_mul` groups)."""
        mul = self.cfg.finetune.lr_mul
        return {f"{name}.": mul for name in self.head_modules} if mul != 1.0 else {}

    # ------------------------------------------------------------------ step
    def attach(self, model, layout, device) -> None:
        hard = self.task == "retrieval" and self.cfg.finetune.hard_negatives
        self.train_fn = retrieval_hard_train if hard else training_function(model.head)
        self.head_modules = model.head_prefixes()

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        # RE's training loss is a sum over the micro-batch (UNITER's reduction); the others are means.
        if task == "re":
            return {"loss": 1.0}
        return {"loss": float(batch["n_items"])}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        return StepPlan(lambda i, batch: (self.train_fn,))

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import uniter_work

        return uniter_work(batch, self.cfg.model)

    def validate(self, engine, tok, splits: dict, info, skipped: dict[str, int]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, (task, examples) in splits.items():
            result = score_split(engine, self, tok, examples, info, skipped)
            metrics.update({f"val/{key}_{name}": value for name, value in result.metrics.items()})
        return metrics

    # ------------------------------------------------------------------ vlpt evaluate
    @classmethod
    def input_dirs(cls, cfg) -> list:
        from trainer.run_setup import finetune_dirs

        return finetune_dirs(cfg)

    @classmethod
    def evaluation_config(cls, cfg, split: Optional[str]):
        return task_data.evaluation_config(cfg, split)

    def evaluate(self, checkpoint: str, tok, info) -> Evaluation:
        """The fine-tuned head and backbone at `checkpoint`, every scorer run whole (retrieval: the full matrix)."""
        model = self.load_finetuned(checkpoint).to(info.device, self.cfg.precision.torch_dtype)
        skipped: dict[str, int] = {}
        examples = self.val_folder.examples
        result = score_split(model, self, tok, examples, info, skipped, full=True)
        return Evaluation(self.task, self.cfg.finetune.val, len(examples), result.metrics, result.predictions,
                          {**self.val_folder.skipped, **skipped})

    def load_finetuned(self, checkpoint: str) -> UniterForFinetuning:
        model = self.build_model()  # finetune.init_from is cleared: the head's own init, then the checkpoint
        sd, where = read_weights(checkpoint, "--checkpoint")
        try:
            report = load_pretrained(model, sd, model.head)
        except ValueError as e:
            raise ConfigError(f"--checkpoint {checkpoint}: {e}") from None
        if report.missing:
            raise ConfigError(f"--checkpoint {checkpoint} has no {self.task} head ({', '.join(report.missing[:3])} "
                              f"missing): it is not fine-tuned on {self.task}; pass a `vlpt finetune` run or checkpoint")
        log.info("evaluating %s", where)
        return model.eval()


def _prefixes(keys: list[str]) -> str:
    """`vqa_output.*` for a list of keys: the module prefixes, for one log line."""
    heads = sorted({k.split(".")[0] + ".*" for k in keys})
    return ", ".join(heads) or "none"
