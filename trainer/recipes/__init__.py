"""Model families, one recipe module each, looked up by `model.arch` (docs/design.md, "Recipes").

A recipe module defines a `Recipe` subclass (trainer/recipes/base.py) and calls `register`
on it when imported. The two built-in families are imported on first lookup; a family
of your own is a module that registers itself, named in the `VLPT_RECIPES` environment
variable (comma-separated module names, imported before the config is read) or imported
by your own code before it calls `trainer.run.pretrain`. A config file never names code
to import: the environment, like PYTHONPATH, is the operator's, a config may be anyone's.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.recipes.base import Recipe

DEFAULT_ARCH = "uniter"
BUILTIN = {"uniter": "trainer.recipes.uniter", "albef": "trainer.recipes.albef"}
ENV_MODULES = "VLPT_RECIPES"

_REGISTRY: dict[str, type["Recipe"]] = {}


def register(recipe: type["Recipe"]) -> type["Recipe"]:
    """Make `recipe` the family of `model.arch: <recipe.arch>`; usable as a class decorator."""
    known = _REGISTRY.get(recipe.arch)
    if known is not None and known is not recipe:
        raise ValueError(f"model.arch={recipe.arch!r} is already registered by {known.__module__}.{known.__name__}")
    _REGISTRY[recipe.arch] = recipe
    return recipe


def _import_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"{ENV_MODULES}={os.environ[ENV_MODULES]!r}: cannot import {name!r}: {e}") from None


def recipe_class(arch: str) -> type["Recipe"]:
    """The recipe of `model.arch`; ValueError naming the known ones otherwise."""
    if arch not in _REGISTRY and arch in BUILTIN:
        importlib.import_module(BUILTIN[arch])
    if arch not in _REGISTRY:
        _import_plugins()
    if arch not in _REGISTRY:
        raise ValueError(f"model.arch={arch!r} is not a known model family; known: {', '.join(known_archs())} "
                         f"(a family of your own: name its module in {ENV_MODULES})")
    return _REGISTRY[arch]


def known_archs() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))
