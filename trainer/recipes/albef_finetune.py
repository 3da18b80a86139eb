"""ALBEF's fine-tuning (docs/downstream.md, "ALBEF retrieval", "ALBEF visual entailment", "ALBEF NLVR2",
"ALBEF VQA", "ALBEF grounding"): one recipe per task (`ta`: NLVR2's text-assignment pretraining), registered
here as the family's `finetune` recipe, which picks the config's task's (`for_config`)."""
from __future__ import annotations

import importlib

from data.shards import PIXEL_FORMAT
from trainer.models.config import AlbefConfig
from trainer.recipes import register
from trainer.recipes.base import Recipe

TASK_RECIPES = {"retrieval": ("trainer.recipes.albef_retrieval", "AlbefRetrievalRecipe"),
                "ve": ("trainer.recipes.albef_ve", "AlbefVeRecipe"),
                "nlvr2": ("trainer.recipes.albef_nlvr2", "AlbefNlvr2Recipe"),
                "ta": ("trainer.recipes.albef_ta", "AlbefTextAssignmentRecipe"),
                "vqa": ("trainer.recipes.albef_vqa", "AlbefVqaRecipe"),
                "grounding": ("trainer.recipes.albef_grounding", "AlbefGroundingRecipe")}
"""Task -> (module, class) of its recipe, imported when a config names the task."""


@register
class AlbefFinetuneRecipe(Recipe):
    arch = "albef"
    stage = "finetune"
    model_config = AlbefConfig
    tasks = tuple(TASK_RECIPES)
    shard_format = PIXEL_FORMAT

    def __new__(cls, cfg):
        """Made from a config, it is the config's task's recipe (so `recipe_class(...)(cfg)` works too)."""
        return cls.for_config(cfg)(cfg)

    @classmethod
    def for_config(cls, cfg) -> type[Recipe]:
        if len(cfg.tasks) != 1:
            raise ValueError(f"stage: finetune trains one task; tasks: has {sorted(cfg.tasks)}; keep one of "
                             f"{', '.join(TASK_RECIPES)}")
        module, name = TASK_RECIPES[next(iter(cfg.tasks))]
        return getattr(importlib.import_module(module), name)


def refuse_pretraining_inits(cfg) -> None:
    """A fine-tuning run starts from finetune.init_from, never from model.init_from_bert / init_from_vit."""
    if cfg.model.init_from_bert or cfg.model.init_from_vit:
        raise ValueError("fine-tuning starts from finetune.init_from (an ALBEF pretraining run or file); "
                         "model.init_from_bert / init_from_vit are for pretraining: unset them")


def refuse_task_folders(cfg, what: str) -> None:
    """Tasks trained on picture-caption shards (data.train / data.val) take no task folders."""
    f = cfg.finetune
    if f.train or f.val or f.features:
        raise ValueError(f"{what} reads picture-caption shards from data.train / data.val; finetune.train, "
                         "finetune.val and finetune.features name task folders: unset them")
