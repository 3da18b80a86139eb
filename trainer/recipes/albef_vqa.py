"""ALBEF VQA (docs/downstream.md, "ALBEF VQA"): `stage: finetune`, `model.arch: albef`, `tasks: {vqa: 1}`, as
ALBEF's `VQA.py`: answers are generated, not classified. The question fused with its picture is read by an
answer decoder started from the pretraining checkpoint's fusion layers and MLM head; training sums, over
every labelled answer of a question, its weight times its distilled next-token loss, divided by the step's
questions; scoring ranks the task folder's answer vocabulary (ALBEF's answer list): the k answers with the
likeliest first word piece, re-ranked by their whole sequence (trainer/objectives/albef.py).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from data.collate_albef import answer_batch, collate_albef_vqa
from data.loader import add_counts
from trainer.downstream_eval import classifier_scores
from trainer.models.albef_finetune_load import decoder_from_fusion
from trainer.models.albef_vqa import AlbefVqa
from trainer.objectives.albef import distilled_answer_losses
from trainer.objectives.base import TaskResult
from trainer.recipes import task_data
from trainer.recipes.albef_classify import AlbefClassifierRecipe

TASK = "vqa"
NOT_IN_VQA = ("vision_proj.", "text_proj.", "itm_head.", "temp", "queues.")
"""What a pretraining checkpoint holds that ALBEF's VQA model has no place for (dropped on load)."""
NO_ANSWER = "no_answer_in_vocabulary"
"""Skip reason of a training question none of whose answers is in the vocabulary: it has nothing to generate."""


class AlbefVqaRecipe(AlbefClassifierRecipe):
    """The `vqa` recipe of ALBEF's fine-tuning (trainer/recipes/albef_finetune.py picks it)."""

    tasks = (TASK,)
    task = TASK
    ramp_alpha = True
    dropped = NOT_IN_VQA
    new_heads = ()
    missing_head_hint = " (a VQA model needs its answer decoder: pass a `vlpt finetune` run on vqa)"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.labels: list[str] = []
        self.answers: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))

    def checkpoint_model(self) -> AlbefVqa:
        return AlbefVqa(self.cfg.model)

    def adapt(self):
        return decoder_from_fusion

    def check_data(self, tok) -> None:
        super().check_data(tok)
        self.labels = task_data.answer_vocabulary((self.train_folder, self.val_folder))
        self.answers = answer_batch(self.labels, tok, self.cfg.data.max_txt_len)  # [A, La] each
        folder = self.train_folder
        if folder is not None:
            answered = [r for r in folder.examples if r.get("labels")]
            if len(answered) < len(folder.examples):
                add_counts(folder.skipped, {NO_ANSWER: len(folder.examples) - len(answered)})
            folder.examples = answered
            if not answered:
                raise ValueError(f"finetune.train={self.cfg.finetune.train}: no question has an answer in the "
                                 "vocabulary; rebuild the folder with `vlpt tasks vqa`")

    def collate(self, task: str, tok, train: bool = True):
        d = self.cfg.data
        return functools.partial(collate_albef_vqa, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 answers=self.labels, train=train)

    @staticmethod
    def losses(model, batch: dict, logits_m: torch.Tensor, alpha: float) -> TaskResult:
        """Sum over the micro-batch's answers of weight x distilled answer loss (the step divides by its
        questions: ALBEF's `(weights * loss).sum() / B`)."""
        logits = model.logits(batch)  # [N, La, V]
        per_answer = distilled_answer_losses(logits, logits_m, batch["answer_ids"], batch["answer_mask"], alpha)
        loss = (batch["answer_weights"] * per_answer).sum()
        return TaskResult({"loss": loss}, {"loss": loss.detach()}, {})

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_vqa_work

        return albef_vqa_work(batch, self.cfg.model)

    def predict_task(self) -> Callable:
        ids, mask = self.answers
        return functools.partial(AlbefVqa.ranked_scores, answer_ids=ids, answer_mask=mask, k=self.cfg.model.k_test)

    def score(self, engine, tok, examples: list[dict], info, skipped: dict[str, int]):
        """Collective. VQA score (when labelled) and the chosen answers."""
        return classifier_scores(TASK, examples, self.outputs(engine, tok, examples, info, skipped), self.labels)
