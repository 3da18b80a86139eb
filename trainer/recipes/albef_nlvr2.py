"""ALBEF NLVR2 (docs/downstream.md, "ALBEF NLVR2"): `stage: finetune`, `model.arch: albef`, `tasks: {nlvr2: 1}`,
as ALBEF's `NLVR.py`. Both pictures of an example go through the image encoder in one pass; the two-image
text encoder's fusion layers alternate between them (left on even layers, right on odd, each pair's
cross-attention key/value shared); a 2-way `cls_head` on the fused [CLS], distilled with alpha ramped over
the first epoch. It starts from a text-assignment run (`tasks: {ta: 1}`, trainer/recipes/albef_ta.py; ALBEF's
route) or straight from a pretraining checkpoint, whose fusion layer k then seeds layers 2k and 2k+1.
"""
from __future__ import annotations

import functools

from data.collate_albef import collate_albef_nlvr2
from trainer.downstream_eval import nlvr2_scores
from trainer.models.albef_finetune_load import two_image_layers
from trainer.recipes.albef_classify import AlbefClassifierRecipe

TASK = "nlvr2"
NOT_IN_NLVR2 = ("vision_proj.", "text_proj.", "itm_head.", "temp", "queues.", "text_encoder.cls.", "ta_head.")
"""What a pretraining or text-assignment checkpoint holds that ALBEF's NLVR2 model has no place for."""


class AlbefNlvr2Recipe(AlbefClassifierRecipe):
    """The `nlvr2` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    tasks = (TASK,)
    task = TASK
    num_classes = 2
    images = 2
    ramp_alpha = True
    dropped = NOT_IN_NLVR2
    missing_head_hint = " (an NLVR2 model needs its cls_head: pass a `vlpt finetune` run on nlvr2)"

    def adapt(self):
        return two_image_layers(self.cfg.model.fusion_layers)

    def collate(self, task: str, tok, train: bool = True):
        d = self.cfg.data
        return functools.partial(collate_albef_nlvr2, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 train=train)

    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]):
        """Collective. Accuracy and consistency (when labelled) and the predicted labels (1 true, 0 false)."""
        return nlvr2_scores(examples, self.outputs(engine, tok, examples, info, skipped))
