"""Helpers for tests that drive the real engine with prepared batches."""
from __future__ import annotations


class ListLoader:
    """Stands in for ResumableTaskLoader: gives the prepared micro-batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
