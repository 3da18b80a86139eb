"""ALBEF (docs/models.md, "ALBEF"): ViT pixels + text; ITC against a momentum queue, hard-negative
ITM and distilled MLM on every batch, with a momentum teacher outside the DeepSpeed engine.

One optimizer step: the teacher (EMA of the student, fp32, whole on every rank) first encodes
every micro-batch of the step; the momentum features of the whole global batch are all-gathered;
each micro-batch's student loss then contrasts against them plus the queue; the queue takes the
global batch once, after the last micro-batch. Each loss is normalised by its term count over the
whole step (ITC: B pairs, ITM: 3B pairs, MLM: the masked tokens) and the hard negatives are drawn
from a seed of (seed, step, stream), so the update does not depend on how the global batch is
split into ranks and micro-batches.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from data.collate_albef import collate_albef
from data.shards import PIXEL_FORMAT
from trainer.distributed import all_gather_varying_rows
from trainer.models.albef import Albef, AlbefTeacher, build_albef
from trainer.models.config import AlbefConfig
from trainer.objectives.albef import alpha_at
from trainer.recipes import register
from trainer.recipes.albef_tasks import TeacherTargets, albef_losses, negatives_seed, teacher_precision
from trainer.recipes.base import Recipe, StepContext, StepPlan
from trainer.retrieval import load_retrieval_set, retrieval_metrics

TASK = "albef"
"""ALBEF's one task: ITC + hard-negative ITM + distilled MLM on every batch, summed."""


@register
class AlbefRecipe(Recipe):
    arch = "albef"
    model_config = AlbefConfig
    tasks = (TASK,)
    shard_format = PIXEL_FORMAT

    @classmethod
    def check_config(cls, cfg) -> None:
        check_picture_size(cfg)
        if cfg.data.uniter.token_budget:
            raise ValueError("data.uniter.token_budget batches are for UNITER; ALBEF batches have a fixed size "
                             "(the queue advances by the global batch): set data.uniter.token_budget=0")
        if cfg.data.max_txt_len + 2 > cfg.model.max_position_embeddings:
            raise ValueError(f"data.max_txt_len={cfg.data.max_txt_len} + [CLS]/[SEP] exceeds "
                             f"model.max_position_embeddings={cfg.model.max_position_embeddings}")

    @classmethod
    def check_layout(cls, cfg, layout) -> None:
        """The queue takes each step's global batch whole (ALBEF: 65,536 features, batch 512)."""
        queue, batch = cfg.model.queue_size, layout.global_batch_size
        if batch <= 0 or queue % batch:
            raise ValueError(f"model.queue_size={queue} must be a multiple of the global batch {batch} (data."
                             f"micro_batch_size {layout.micro_batch_size} x grad accum {layout.grad_accum} x "
                             f"{layout.world_size} ranks); change model.queue_size or optim.global_batch_size")

    def stream_options(self) -> dict:
        return {"modality": "pixels", "img_dim": 0}

    def build_model(self):
        return build_albef(self.cfg.model)

    def checkpoint_model(self):
        return Albef(self.cfg.model)

    def collate(self, task: str, tok):
        d = self.cfg.data
        return functools.partial(collate_albef, tok=tok, pixels=d.albef.pixels, max_txt_len=d.max_txt_len,
                                 mlm_prob=d.mlm_prob)

    def attach(self, model, layout, device) -> None:
        """The momentum model and queues, copied from the student before the engine wraps it."""
        self.check_layout(self.cfg, layout)
        self.teacher = AlbefTeacher(model).to(device)

    def blocks_to_compile(self, model) -> dict:
        """The student's blocks and the teacher's: the teacher encodes every micro-batch of every step."""
        teacher = self.teacher
        return {"ViT blocks": vit_blocks(model.visual_encoder), "text layers": list(model.text_encoder.layer),
                "fusion layers": list(model.text_encoder.fusion),
                "teacher blocks": [*vit_blocks(teacher.visual_encoder), *teacher.text_encoder.layer,
                                   *teacher.text_encoder.fusion]}

    def on_loaders(self, loaders: dict, layout) -> None:
        warmup = self.cfg.model.alpha_warmup_steps
        if warmup is None:  # one epoch of the training data, as ALBEF
            samples = sum(loader.dataset.spec.total_samples for loader in loaders.values())
            warmup = -(-samples // layout.global_batch_size)
        self.alpha_warmup = warmup

    def replicated(self) -> dict:
        return {"teacher": self.teacher}

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        rows = float(batch["n_items"])
        return {"itc": rows, "itm": 3.0 * rows, "mlm": float(batch["mlm_index"].numel())}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        """EMA (not right after a skipped step: the student did not move, the EMA must not apply it
        twice), then the teacher's features of the whole global batch."""
        teacher, precision = self.teacher, self.cfg.precision.dtype
        encoded, image_all, text_all, offsets = self.teacher_features(engine, batches, ctx)
        alpha = alpha_at(self.cfg.model.alpha, ctx.step, self.alpha_warmup)

        def forward_args(i: int, batch: dict) -> tuple:
            with teacher_precision(ctx.device, precision):
                logits_m = teacher.mlm_logits(batch, encoded[i][0])  # [N, V]
            targets = TeacherTargets(image_all, text_all, teacher.queues.image_queue, teacher.queues.text_queue,
                                     offsets[i], logits_m, alpha, negatives_seed(ctx.seed, ctx.step,
                                                                                  int(batch["stream"])))
            return albef_losses, targets

        def finish(means: dict[str, float], skipped: bool) -> None:
            means["loss"] = means["itc"] + means["itm"] + means["mlm"]
            if not skipped:  # a skipped step leaves the queue as it was, like the weights
                teacher.queues.push(image_all, text_all)

        return StepPlan(forward_args, finish)

    def teacher_features(self, engine, batches: list[dict], ctx: StepContext) -> tuple[list, Tensor, Tensor, list[int]]:
        """The EMA (not right after a skipped step), then the teacher's encoding of each micro-batch
        (image tokens, image feat, text feat), the momentum features of the whole global batch
        ([B, D] each, all ranks in stream order) and each micro-batch's first row in it."""
        teacher = self.teacher
        if not ctx.after_skip:
            teacher.update(engine.module)
        with teacher_precision(ctx.device, self.cfg.precision.dtype):
            encoded = [teacher.encode(b) for b in batches]  # (image tokens, image feat, text feat)
        local = torch.cat([torch.cat([image_f, text_f], dim=1) for _, image_f, text_f in encoded])  # [rows, 2D]
        features, sizes = all_gather_varying_rows(local)  # [B, 2D], rows in stream order
        image_all, text_all = features.chunk(2, dim=1)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        offsets = [sum(sizes[:rank]) + sum(b["n_items"] for b in batches[:i]) for i in range(len(batches))]
        return encoded, image_all, text_all, offsets

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import albef_work

        return albef_work(batch, self.cfg.model)  # student fwd + bwd and the teacher's forward

    def read_val_split(self, shards: list[str], tok, skipped: dict[str, int]):
        d = self.cfg.data
        return load_retrieval_set(shards, tok, d.max_txt_len, self.cfg.storage.s3, d.decode_limits(), skipped=skipped)

    def validate(self, engine, tok, splits: dict, info, skipped: dict[str, int]) -> dict[str, float]:
        """Retrieval (ITC top-k re-scored by ITM) on each held-out split; keys `val/<key>_t2i_r1`."""
        cfg, metrics = self.cfg, {}
        for key, (_, data) in splits.items():
            found = retrieval_metrics(engine, data, cfg.data.albef.pixels, k=cfg.model.k_test,
                                      batch_size=cfg.data.val_batch_size, device=info.device, rank=info.rank,
                                      world=info.world_size)
            metrics.update({f"val/{key}_{k}": v for k, v in found.items()})
        return metrics


def check_picture_size(cfg) -> None:
    """The pictures are made at the size the image encoder's position grid has."""
    if cfg.data.albef.pixels.image_size != cfg.model.image_size:
        raise ValueError(f"data.albef.pixels.image_size={cfg.data.albef.pixels.image_size} must equal "
                         f"model.image_size={cfg.model.image_size}")


def vit_blocks(vit) -> list:
    """A `transformers` ViTModel's blocks: in `layers` from transformers 5, in `encoder.layer` before."""
    return list(vit.layers if hasattr(vit, "layers") else vit.encoder.layer)
