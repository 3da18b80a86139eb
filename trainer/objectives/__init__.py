"""Pretraining objectives: each maps (model, batch) to a summed loss and summed stats.

Losses are returned as sums over the batch's loss terms (`batch["n_items"]` of
them); the trainer divides by the number of terms in the whole optimizer step
over all ranks, so the gradient is that of the global mean whatever the split
into processes and micro-batches.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from trainer.objectives.base import TaskResult
from trainer.objectives.itm import WraConfig, itm_hard_objective, itm_objective
from trainer.objectives.mlm import mlm_objective
from trainer.objectives.mrm import mrc_kl_objective, mrc_objective, mrfr_objective

Objective = Callable[..., TaskResult]


def build_objectives(wra: Optional[WraConfig] = None) -> dict[str, Objective]:
    """Task name -> objective, with the run's objective settings bound."""
    wra = wra or WraConfig()
    return {"mlm": mlm_objective,
            "itm": functools.partial(itm_objective, wra=wra),
            "itm-hard": functools.partial(itm_hard_objective, wra=wra),
            "mrfr": mrfr_objective, "mrc": mrc_objective, "mrc-kl": mrc_kl_objective}


OBJECTIVES = build_objectives()

__all__ = ["OBJECTIVES", "Objective", "TaskResult", "WraConfig", "build_objectives", "itm_hard_objective",
           "itm_objective", "mlm_objective", "mrc_kl_objective", "mrc_objective", "mrfr_objective"]
