"""Pretraining objectives: functions of tensors (model outputs and batch tensors) to summed losses.

Losses are returned as sums over the batch's loss terms; the optimizer step divides each by
its number of terms in the whole step over all ranks, so the gradient is that of the global
mean whatever the split into processes and micro-batches. The recipes (trainer/recipes/)
run the model and hand its outputs to these functions.
"""
