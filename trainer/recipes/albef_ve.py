"""ALBEF visual entailment (docs/downstream.md, "ALBEF visual entailment"): `stage: finetune`, `model.arch:
albef`, `tasks: {ve: 1}`, as ALBEF's `VE.py`: one fusion pass per (picture, hypothesis), a 3-way `cls_head`
on the fused [CLS], distilled with alpha constant (ALBEF: no warm-up for VE). The shared machinery is
trainer/recipes/albef_classify.py.
"""
from __future__ import annotations

import functools

from data.collate_albef import ALBEF_VE_LABELS, collate_albef_ve
from data.tasks.records import VE_LABELS
from trainer.downstream_eval import classifier_scores
from trainer.recipes.albef_classify import NEW, AlbefClassifierRecipe, classifier_losses

__all__ = ["AlbefVeRecipe", "NEW", "NOT_IN_VE", "TO_UNITER_ORDER", "ve_losses"]
TASK = "ve"
NOT_IN_VE = ("vision_proj.", "text_proj.", "itm_head.", "temp", "queues.", "text_encoder.cls.")
"""What a pretraining checkpoint holds that ALBEF's VE model has no place for (dropped on load)."""
TO_UNITER_ORDER = [ALBEF_VE_LABELS.index(name) for name in VE_LABELS]
"""Column of each task-folder label (contradiction, entailment, neutral) among ALBEF's logits."""
ve_losses = classifier_losses


class AlbefVeRecipe(AlbefClassifierRecipe):
    """The `ve` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    tasks = (TASK,)
    task = TASK
    num_classes = len(ALBEF_VE_LABELS)
    dropped = NOT_IN_VE
    missing_head_hint = " (a VE model needs its cls_head: pass a `vlpt finetune` run on ve)"

    def collate(self, task: str, tok, train: bool = True):
        d = self.cfg.data
        return functools.partial(collate_albef_ve, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 train=train)

    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]):
        """Collective. Accuracy (when labelled) and the predicted label names, in the task folder's terms."""
        out = self.outputs(engine, tok, examples, info, skipped)
        in_folder_order = {i: v.reshape(-1)[TO_UNITER_ORDER] for i, v in out.items()}
        return classifier_scores(TASK, examples, in_folder_order, list(VE_LABELS))
