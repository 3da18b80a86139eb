"""Model families, one recipe module each, looked up by `model.arch` (docs/design.md, "Recipes").

A recipe module defines a `Recipe` subclass (trainer/recipes/base.py) and calls `register`
on it when imported. The two built-in families are imported on first lookup; a family
of your own is a module that registers itself, named in the `VLPT_RECIPES` environment
variable (comma-separated module names, imported before the config is read) or imported
by your own code before it calls `trainer.run.pretrain`. A config file never names code
to import: the environment, like PYTHONPATH, is the operator's, a config may be anyone's.

A family has a recipe per stage: `pretrain` and, for fine-tuning (`stage: finetune`,
docs/downstream.md), `finetune`; a recipe's `stage` class attribute says which.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.recipes.base import Recipe

DEFAULT_ARCH = "uniter"
BUILTIN = {("uniter", "pretrain"): "trainer.recipes.uniter", ("albef", "pretrain"): "trainer.recipes.albef",
           ("uniter", "finetune"): "trainer.recipes.uniter_finetune",
           ("albef", "finetune"): "trainer.recipes.albef_finetune"}
ENV_MODULES = "VLPT_RECIPES"

_REGISTRY: dict[tuple[str, str], type["Recipe"]] = {}


def register(recipe: type["Recipe"]) -> type["Recipe"]:
    """Make `recipe` the `recipe.stage` recipe of `model.arch: <recipe.arch>`; usable as a class decorator."""
    key = (recipe.arch, recipe.stage)
    known = _REGISTRY.get(key)
    if known is not None and known is not recipe:
        raise ValueError(f"model.arch={recipe.arch!r} ({recipe.stage}) is already registered by "
                         f"{known.__module__}.{known.__name__}")
    _REGISTRY[key] = recipe
    return recipe


def _import_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"{ENV_MODULES}={os.environ[ENV_MODULES]!r}: cannot import {name!r}: {e}") from None


def recipe_class(arch: str, stage: str = "pretrain") -> type["Recipe"]:
    """The `stage` recipe of `model.arch`; ValueError naming the known ones otherwise."""
    key = (arch, stage)
    if key not in _REGISTRY and key in BUILTIN:
        importlib.import_module(BUILTIN[key])
    if key not in _REGISTRY:
        _import_plugins()
    if key not in _REGISTRY:
        if arch not in known_archs():
            raise ValueError(f"model.arch={arch!r} is not a known model family; known: {', '.join(known_archs())} "
                             f"(a family of your own: name its module in {ENV_MODULES})")
        raise ValueError(f"stage: {stage} is not available for model.arch={arch!r}; the {arch} family has: "
                         f"{', '.join(s for a, s in sorted(set(BUILTIN) | set(_REGISTRY)) if a == arch)}")
    return _REGISTRY[key]


def recipe_for(cfg) -> type["Recipe"]:
    """The recipe that runs `cfg`: its family's recipe of its stage, or the one of its task where the family
    has one per task (`Recipe.for_config`)."""
    return recipe_class(cfg.model.arch, cfg.stage).for_config(cfg)


def known_archs() -> list[str]:
    return sorted({a for a, _ in set(BUILTIN) | set(_REGISTRY)})
