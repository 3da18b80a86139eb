"""NLVR2's text-assignment pretraining (docs/downstream.md, "ALBEF NLVR2"): `stage: finetune`, `model.arch:
albef`, `tasks: {ta: 1}` on picture-caption shards (`data.train`), as ALBEF's `Pretrain_nlvr.py`.

The model is NLVR2's two-image encoder (trainer/models/albef_classifier.py, `TextAssignment`) started from
a pretraining checkpoint (fusion layer k seeds layers 2k and 2k+1). For caption i of a micro-batch it sees
two of the micro-batch's pictures, drawn by their similarity to picture i (trainer/objectives/albef.py,
`text_assignment_draws`), and says which one the caption belongs to, or neither: CE on a 3-way `ta_head`.
There is no momentum model and no held-out metric (ALBEF has neither); the NLVR2 run started from this
one's checkpoint (`finetune.init_from`) is what is evaluated. The draws come from a seed of (seed, step,
stream), so the update does not depend on how the global batch is split into ranks and micro-batches.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from data.collate_albef import collate_albef_ta
from trainer.models.albef_classifier import TextAssignment
from trainer.models.albef_finetune_load import read_into, two_image_layers
from trainer.objectives.albef import text_assignment_draws
from trainer.objectives.base import TaskResult
from trainer.recipes.albef import AlbefRecipe, vit_blocks
from trainer.recipes.albef_finetune import refuse_pretraining_inits, refuse_task_folders
from trainer.recipes.albef_tasks import negatives_seed
from trainer.recipes.base import StepContext, StepPlan

log = logging.getLogger("vlpt")
TASK = "ta"
NOT_IN_TA = ("text_proj.", "itm_head.", "temp", "queues.", "text_encoder.cls.", "cls_head.")
"""What a pretraining checkpoint holds that the text-assignment model has no place for (dropped on load)."""
NEW = ("ta_head.",)


class AlbefTextAssignmentRecipe(AlbefRecipe):
    """The `ta` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    stage = "finetune"
    tasks = (TASK,)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        refuse_task_folders(cfg, "text assignment")
        refuse_pretraining_inits(cfg)
        if cfg.data.val:
            raise ValueError("text assignment has no held-out metric (ALBEF's has none): unset data.val and "
                             "evaluate the NLVR2 run fine-tuned from this one")

    @classmethod
    def evaluation_config(cls, cfg, split: Optional[str]):
        raise ValueError("vlpt evaluate: a text-assignment run has nothing to score; evaluate the NLVR2 run "
                         "fine-tuned from it (tasks: {nlvr2: 1})")

    def build_model(self) -> TextAssignment:
        model = self.checkpoint_model()
        source = self.cfg.finetune.init_from
        if source:
            adapt = two_image_layers(self.cfg.model.fusion_layers)
            loaded = read_into(model, source, "finetune.init_from", adapt=adapt, new=NEW, dropped=NOT_IN_TA)
            log.info("initialised from %s: %d tensors (fusion layers doubled where the source has one image); "
                     "ta_head.*: %s; its momentum model is not used", loaded.where, len(loaded.student_keys),
                     "loaded" if any(k.startswith(NEW) for k in loaded.student_keys) else "new")
        return model

    def checkpoint_model(self) -> TextAssignment:
        return TextAssignment(self.cfg.model)

    def collate(self, task: str, tok):
        d = self.cfg.data
        return functools.partial(collate_albef_ta, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len)

    def attach(self, model, layout, device) -> None:
        """No momentum model, no queue."""

    def replicated(self) -> dict:
        return {}

    def blocks_to_compile(self, model) -> dict:
        return {"ViT blocks": vit_blocks(model.visual_encoder), "text layers": list(model.text_encoder.layer),
                "fusion layers": list(model.text_encoder.fusion)}

    def val_splits(self, tok, skipped: dict[str, int]) -> dict:
        return {}

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        return {"loss": float(batch["n_items"])}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        def forward_args(i: int, batch: dict) -> tuple:
            return ta_losses, negatives_seed(ctx.seed, ctx.step, int(batch["stream"]))

        return StepPlan(forward_args)

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_classifier_work

        return albef_classifier_work(batch, self.cfg.model, images=2, pictures=1, teacher=False)


def ta_losses(model: TextAssignment, batch: dict, seed: int) -> TaskResult:
    """Summed CE and correct assignments over the micro-batch's b captions."""
    image = model.image_tokens(batch["pixels"])  # [b, 1+P, Hv]
    generator = torch.Generator(device=image.device).manual_seed(seed)
    left, right, labels = text_assignment_draws(model.partner_weights(image), generator)  # [b] each
    logits = model.logits(batch, image, left, right)  # [b, 3]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).float().sum().detach()
    return TaskResult({"loss": loss}, {"loss": loss.detach(), "acc": correct}, {})
