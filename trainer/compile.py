"""`train.compile`: torch.compile of each transformer block in place, "regional compilation"
(docs/operations.md, "Compiled layers").

Each block the recipe names is compiled on its own with `nn.Module.compile()`, which leaves the
module tree as it is: parameter names, state-dict keys, checkpoints, conversion and ZeRO's parameter
names are the eager model's. Blocks of one class share their compiled code (parameters are inputs
of the graph, not constants), so a stack of 24 layers costs the compile time of one; what lies
between the blocks (embeddings, gathers, heads, losses, WRA's optimal transport) stays eager.
"""
from __future__ import annotations

import logging

from torch import nn

from trainer.config_files import ConfigError
from trainer.recipes.base import Recipe

log = logging.getLogger(__name__)

COMPILE_OPTIONS = {"dynamic": True, "fullgraph": True}
"""dynamic: batches come in many [B, L] (L follows the longest sample, B the token budget); sizes
compiled as symbols serve them all, where automatic dynamic shapes compile again for the first new
L and once more for the first new B (a batch of 1 still gets its own graph: size 1 is always
specialised). fullgraph: a graph break inside a block is a bug to fix, not a silent slowdown."""


def compile_regions(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    """Compile in place the blocks `recipe.blocks_to_compile(model)` names; returns {group: blocks}.

    Call after `recipe.attach` (the blocks may be of what the recipe holds beside the model) and
    before the engine wraps the model."""
    groups = {name: blocks for name, blocks in recipe.blocks_to_compile(model).items() if blocks}
    if not groups:
        raise ConfigError(f"train.compile: model.arch={recipe.arch!r} names no blocks to compile "
                          "(Recipe.blocks_to_compile); set train.compile=false")
    for blocks in groups.values():
        for block in blocks:
            block.compile(**COMPILE_OPTIONS)
    counts = {name: len(blocks) for name, blocks in groups.items()}
    log.info("torch.compile: %s (dynamic shapes)", ", ".join(f"{n} {name}" for name, n in counts.items()))
    return counts
