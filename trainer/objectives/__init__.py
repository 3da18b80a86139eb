"""Pretraining objectives: each maps (model, batch) to a summed loss and summed stats.

Losses are returned as sums over the batch's loss terms (`batch["n_items"]` of
them); the trainer divides by the number of terms in the whole optimizer step
over all ranks, so the gradient is that of the global mean whatever the split
into processes and micro-batches.
"""
from trainer.objectives.base import TaskResult
from trainer.objectives.itm import itm_objective
from trainer.objectives.mlm import mlm_objective

OBJECTIVES = {"mlm": mlm_objective, "itm": itm_objective}

__all__ = ["OBJECTIVES", "TaskResult", "itm_objective", "mlm_objective"]
