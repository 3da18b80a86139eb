"""UNITER (docs/models.md, "UNITER"): region features + text, a task mix of MLM, ITM with
word-region alignment, MRFR, MRC and MRC-kl (and hard-negative ITM), one task per step."""
from __future__ import annotations

import functools
from typing import Iterable

import torch

from data.collate import collate_itm, collate_itm_hard, collate_mlm, collate_mrm
from data.loader import add_counts, iter_split, pin, validation_batches
from data.packing import round_up
from data.shards import FORMAT, manifest_root
from trainer.distributed import all_gather_objects, all_reduce_sum
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining, build_uniter
from trainer.recipes import register
from trainer.recipes.base import Recipe, StepContext, StepPlan
from trainer.recipes.uniter_tasks import task_functions
from trainer.step import accumulate, global_means
from trainer.task_mix import task_mix, task_of

SOFT_LABEL_TASKS = ("mrc", "mrc-kl")
"""The tasks that read `mrc_soft_labels`."""


@register
class UniterRecipe(Recipe):
    arch = "uniter"
    model_config = ModelConfig
    tasks = ("mlm", "itm", "itm-hard", "mrfr", "mrc", "mrc-kl")
    shard_format = FORMAT

    @classmethod
    def check_config(cls, cfg) -> None:
        pack_len, max_txt_len = cfg.data.uniter.pack_len, cfg.data.max_txt_len
        if pack_len and pack_len < max_txt_len + 3:
            raise ValueError(f"data.uniter.pack_len={pack_len} cannot hold the longest caption, data.max_txt_len="
                             f"{max_txt_len} word pieces + [CLS]/[SEP], with even one region; set it to a multiple "
                             f"of 8 of at least data.max_txt_len + 2 + the most regions per image (e.g. "
                             f"{round_up(max_txt_len + 2 + 100)} for UNITER's up to 100 boxes), or 0")

    def check_manifest(self, manifest, where: str) -> None:
        model = self.cfg.model
        if manifest.img_dim != model.img_dim:
            raise ValueError(f"model.img_dim={model.img_dim} but {where} has {manifest.img_dim}-d region features")
        if manifest.has_soft_labels and manifest.label_dim != model.img_label_dim:
            raise ValueError(f"model.img_label_dim={model.img_label_dim} but {where} has "
                             f"{manifest.label_dim} soft-label classes")
        if not manifest.has_soft_labels:
            self._check_no_soft_label_tasks(manifest, where)
        self._check_pack_len_fits(manifest, where)

    def _check_no_soft_label_tasks(self, manifest, where: str) -> None:
        """MRC and MRC-kl learn the detector's class distributions: refuse them on a dataset whose shards
        were built without soft labels (only they need them; conf serves box selection when building)."""
        for entry in task_mix(self.cfg):
            if entry.task not in SOFT_LABEL_TASKS:
                continue
            for source in entry.sources:
                if manifest.root in {manifest_root(p) for p in (source.train, source.val) if p}:
                    own = any(d.name == source.name and d.tasks for d in self.cfg.data.datasets)
                    key = f"data.datasets.{source.name}.tasks.{entry.task}" if own else f"tasks.{entry.task}"
                    raise ValueError(f"{key} needs region soft labels but {where} has none (its shards were built "
                                     f"without soft labels); drop the task or rebuild the shards with soft labels")

    def _check_pack_len_fits(self, manifest, where: str) -> None:
        """Shards built by `vlpt shards regions` record their max_bb: refuse a pack_len too short for it
        now rather than at the first sample that does not fit (collate says so then too)."""
        max_bb = (manifest.meta.get("params") or {}).get("max_bb")
        pack_len, max_txt_len = self.cfg.data.uniter.pack_len, self.cfg.data.max_txt_len
        if pack_len and isinstance(max_bb, int) and pack_len < max_txt_len + 2 + max_bb:
            raise ValueError(f"data.uniter.pack_len={pack_len} is shorter than the longest sample {where} can "
                             f"hold: data.max_txt_len={max_txt_len} + [CLS]/[SEP] + max_bb={max_bb} regions; set "
                             f"it to at least {round_up(max_txt_len + 2 + max_bb)}")

    def stream_options(self) -> dict:
        return {"modality": "regions", "img_dim": self.cfg.model.img_dim,
                "token_budget": self.cfg.data.uniter.token_budget}

    def build_model(self):
        return build_uniter(self.cfg.model)

    def checkpoint_model(self):
        return UniterForPretraining(self.cfg.model)

    def collate(self, task: str, tok):
        """The task's collate, for training and validation alike; with data.uniter.pack_len > 0 its
        batches come in packed rows, except itm-hard's (whose rows the objective selects)."""
        d = self.cfg.data
        pack = {"pack_len": d.uniter.pack_len} if d.uniter.pack_len else {}
        if task == "mlm":
            return functools.partial(collate_mlm, tok=tok, mlm_prob=d.mlm_prob, **pack)
        if task == "itm":
            return functools.partial(collate_itm, tok=tok, neg_prob=d.uniter.itm_neg_prob, **pack)
        if task == "itm-hard":
            return functools.partial(collate_itm_hard, tok=tok, candidates=d.uniter.itm_hard_candidates)
        # MRFR, MRC and MRC-kl share the region masking; only their losses differ.
        return functools.partial(collate_mrm, tok=tok, mrm_prob=d.uniter.mrm_prob, task=task, **pack)

    def attach(self, model, layout, device) -> None:
        self.task_fns = task_functions(self.cfg.wra)

    def blocks_to_compile(self, model) -> dict:
        return {"encoder layers": list(model.uniter.encoder.layer)}

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        return {"loss": float(batch["n_items"])}

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        fn = self.task_fns[task]
        return StepPlan(lambda i, batch: (fn,))

    def step_flops(self, batch: dict, task: str):
        from trainer.bench_flops import uniter_work

        return uniter_work(batch, self.cfg.model)  # every task runs the encoder once per row

    def read_val_split(self, shards: list[str], tok, skipped: dict[str, int]) -> list[dict]:
        return list(iter_split(shards, self.cfg.storage.s3, skipped, self.cfg.data.max_member_bytes))

    def validate(self, engine, tok, splits: dict, info, skipped: dict[str, int]) -> dict[str, float]:
        """Mean loss / accuracy of each task on its held-out split (`val/<key>_loss`, ...)."""
        cfg, mine = self.cfg, {}
        batches = {key: validation_batches((), tok, self.collate(task, tok), task=key, seed=cfg.train.seed,
                                           rank=info.rank, world=info.world_size,
                                           batch_size=cfg.data.val_batch_size, max_txt_len=cfg.data.max_txt_len,
                                           img_dim=cfg.model.img_dim, s3=cfg.storage.s3, skipped=mine,
                                           limits=cfg.data.decode_limits(cfg.precision.dtype), raws=raws)
                   for key, (task, raws) in splits.items()}
        metrics = self.evaluate(engine, batches, info.device) if batches else {}
        for rank_skips in all_gather_objects(mine):  # each rank decoded its own share
            add_counts(skipped, rank_skips)
        return metrics

    @torch.no_grad()
    def evaluate(self, engine, task_batches: dict[str, Iterable[dict]], device: torch.device) -> dict[str, float]:
        """Mean loss / accuracy per mix key ("mlm", "coco/itm") over the held-out split, over all ranks."""
        engine.eval()
        metrics: dict[str, float] = {}
        try:
            for key, batches in task_batches.items():
                fn = self.task_fns[task_of(key)]
                sums: dict[str, torch.Tensor] = {}
                counts: dict[str, torch.Tensor] = {}
                n = torch.zeros((), dtype=torch.float64, device=device)
                for batch in batches:
                    accumulate(sums, counts, engine(pin(batch, device), fn))
                    n += batch["n_items"]
                if not sums:
                    continue
                for k, v in global_means(sums, counts, all_reduce_sum(n).float()).items():
                    metrics[f"val/{key}_{k}"] = v
        finally:
            engine.train()
        return metrics
