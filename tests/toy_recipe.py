"""A third model family, defined entirely here: the test of "a new family is one module".

`model.arch: toy` scores whether a caption matches its regions with a bag of words against
the mean region feature, trained on ITM batches with one loss. Imported through
VLPT_RECIPES=tests.toy_recipe, it registers itself; nothing else in vlpt knows of it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from data.collate import collate_itm
from data.shards import FORMAT
from trainer.objectives.base import TaskResult
from trainer.recipes import register
from trainer.recipes.base import Recipe, StepPlan


@dataclass(frozen=True)
class ToyConfig:
    arch: Literal["toy"] = "toy"
    vocab_size: int = 188
    img_dim: int = 16
    hidden_size: int = 8


class ToyMatcher(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.words = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.regions = nn.Linear(cfg.img_dim, cfg.hidden_size)

    def forward(self, batch: dict, task, *args):
        return task(self, batch, *args)

    def match_logits(self, batch: dict) -> Tensor:
        """[B]: mean word vector . mean region vector."""
        valid = batch["attn_masks"][:, :batch["input_ids"].size(1)].unsqueeze(-1).float()  # [B, Lt, 1]
        text = (self.words(batch["input_ids"]) * valid).sum(1) / valid.sum(1).clamp_min(1)  # [B, H]
        n = batch["num_bbs"].clamp_min(1).unsqueeze(-1).float()  # [B, 1]
        image = self.regions(batch["img_feat"].float()).sum(1) / n  # [B, H]; padded regions are 0 -> bias only
        return (text * image).sum(-1)


def match(model: ToyMatcher, batch: dict) -> TaskResult:
    logits = model.match_logits(batch)  # [B]
    targets = batch["itm_targets"].float()  # [B]
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    correct = ((logits > 0).float() == targets).sum()
    return TaskResult({"loss": loss}, {"loss": loss.detach(), "acc": correct})


@register
class ToyRecipe(Recipe):
    arch = "toy"
    model_config = ToyConfig
    tasks = ("match",)
    shard_format = FORMAT

    def stream_options(self) -> dict:
        return {"modality": "regions", "img_dim": self.cfg.model.img_dim}

    def build_model(self) -> nn.Module:
        return ToyMatcher(self.cfg.model)

    def collate(self, task: str, tok):
        return functools.partial(collate_itm, tok=tok, neg_prob=0.5)

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        return {"loss": float(batch["n_items"])}

    def begin_step(self, engine, batches, task, ctx) -> StepPlan:
        return StepPlan(lambda i, batch: (match,))

