"""What a run checks and builds before its first step: inputs, logging, the run folder, the
datasets against the model, and the training loaders."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data.config import DataConfig
from data.loader import ResumableTaskLoader, StreamSpec, TaskBatches
from data.shards import FORMAT, read_manifest
from data.sources import DatasetShards
from data.storage import is_s3
from data.tokenizer import Tokenizer, tokenizer_from_config
from data.tokenizer_report import REPORT_CAPTIONS, caption_stats, report_lines, shard_captions
from trainer.config import Config, PrecisionConfig
from trainer.config_files import ConfigError, path_origin
from trainer.data_health import is_data_error
from trainer.distributed import DistInfo, all_gather_objects, uses_cuda
from trainer.engine import BatchLayout
from trainer.models.weights import read_config_json, word_embedding_rows
from trainer.recipes import recipe_for
from trainer.task_mix import task_mix

if TYPE_CHECKING:  # the recipes' default data hooks call into this module
    from trainer.recipes.base import Recipe

log = logging.getLogger("vlpt")


def check_precision(precision: PrecisionConfig, info: DistInfo) -> None:
    """fp16 needs the accelerator's fp16 support. DeepSpeed's CPU accelerator claims it only
    with mkldnn fp16 (AVX512-FP16 / AMX), yet torch runs fp16 on any CPU in software: there
    we let DeepSpeed go ahead, so a laptop can check an fp16 config (loss scaling, overflow
    skips, ZeRO) before it goes to GPUs."""
    if precision.dtype != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return
    if accelerator.device_name() != "cpu":
        raise ConfigError(f"precision.dtype=fp16: DeepSpeed's {accelerator.device_name()} accelerator does "
                          "not support fp16 on this machine; use bf16 or fp32")
    if info.is_main:
        log.warning("precision.dtype=fp16 on a CPU without native fp16: runs in software, to check the fp16 "
                    "path (loss scaling, overflow skips), not for speed; bf16 is the fast CPU choice")
    accelerator.is_fp16_supported = lambda: True  # DeepSpeed's only objection (engine config check)


@dataclass(frozen=True)
class DatasetDir:
    where: str
    """The config key naming it, for error messages."""
    path: str


def dataset_dirs(data: DataConfig) -> list[DatasetDir]:
    """Every shard directory the run reads (train and val of each dataset)."""
    if not data.datasets:
        named = [("data.train", data.train), ("data.val", data.val)]
    else:
        named = [(f"data.datasets.{d.name}.{split}", getattr(d, split))
                 for d in data.datasets for split in ("train", "val")]
    return [DatasetDir(where, path) for where, path in named if path]


def finetune_dirs(cfg: Config) -> list[DatasetDir]:
    """The task folders and region shard folders a fine-tuning run reads."""
    f = cfg.finetune
    named = [("finetune.train", f.train), ("finetune.val", f.val)]
    named += [(f"finetune.features[{i}]", p) for i, p in enumerate(f.features)]
    return [DatasetDir(where, path) for where, path in named if path]


def check_inputs(cfg: Config) -> None:
    """Fail before any heavy work when a file the config names is missing."""
    need = {"data.tokenizer.path": cfg.data.tokenizer.path}
    for d in recipe_for(cfg).input_dirs(cfg):
        if not is_s3(d.path):  # remote manifests are checked when read
            need[d.where] = os.path.join(d.path, "manifest.json")
    if cfg.stage == "finetune" and cfg.finetune.init_from:
        need["finetune.init_from"] = cfg.finetune.init_from
    for key in ("init_from_bert", "init_from_uniter", "init_from_vit"):
        if getattr(cfg.model, key, None):
            need[f"model.{key}"] = getattr(cfg.model, key)
    for key, path in need.items():
        if not os.path.exists(path):
            shards = key.endswith((".train", ".val", "]"))  # the manifest of a shard or task folder
            written = path_origin(os.path.dirname(path) if shards else path)
            demo = shards and "demo" in path
            hint = " (make the demo shards with `vlpt demo-data [--pixels] [--tasks]`)" if demo else ""
            raise ConfigError(f"{key}: file not found: {path}{written}{hint}")


def run_manifest(cfg: Config, recipe: Recipe, path: str):
    """A shard directory's manifest, read as every part of the run reads it: the recipe's format,
    the run's storage options, and the data section's rule on shards outside the directory."""
    return read_manifest(path, recipe.shard_format, s3=cfg.storage.s3, allow_outside=cfg.data.allow_outside_shards)


def run_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer data.tokenizer names; one line naming the key when it cannot be used."""
    try:
        return tokenizer_from_config(cfg.data.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_vocab_sizes(cfg: Config, tok: Tokenizer) -> None:
    """model.vocab_size against the tokenizer, then model.init_from_bert against both: before the
    model is built, so a mismatch is one line rather than a failed load deep in the build."""
    where = f"data.tokenizer.path={cfg.data.tokenizer.path}"
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but {where} has {tok.vocab_size} word pieces; "
                          f"set model.vocab_size={tok.vocab_size}")
    pad = getattr(cfg.model, "pad_token_id", None)
    if pad is not None and pad != tok.pad_id:
        raise ConfigError(f"model.pad_token_id={pad} but [PAD] is token {tok.pad_id} of {where}; "
                          f"set model.pad_token_id={tok.pad_id}")
    bert = getattr(cfg.model, "init_from_bert", None)
    if not bert:
        return
    try:
        rows, declared = word_embedding_rows(bert), read_config_json(Path(bert)).get("vocab_size")
    except ValueError as e:
        raise ConfigError(f"model.init_from_bert: {e}") from None
    if rows != cfg.model.vocab_size or declared not in (None, rows):
        raise ConfigError(f"model.init_from_bert={bert} has {rows} word-embedding rows (config.json vocab_size="
                          f"{declared}) but model.vocab_size={cfg.model.vocab_size} = the {tok.vocab_size} word "
                          f"pieces of {where}; use the tokenizer that BERT was trained with (its vocab.txt or "
                          "directory) and its vocab_size, or leave model.init_from_bert out")


def checked_recipe(cfg: Config) -> tuple["Recipe", Tokenizer]:
    """The run's recipe and tokenizer, the config checked against the data (one line, exit 2, if not)."""
    recipe = recipe_for(cfg)(cfg)
    tok = run_tokenizer(cfg)
    try:
        recipe.check_data(tok)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return recipe, tok


def validate_against_data(cfg: Config, recipe: Recipe, tok: Tokenizer) -> None:
    """Check the vocabulary sizes and every manifest against the model."""
    check_vocab_sizes(cfg, tok)
    for d in dataset_dirs(cfg.data):
        try:
            manifest = run_manifest(cfg, recipe, d.path)
        except ValueError as e:  # missing, unreadable or invalid: one line naming the key
            hint = (f" (model.arch={recipe.arch} reads {recipe.shard_format!r} shards: "
                    "`vlpt demo-data [--pixels]`, `vlpt shards ...`)" if "format" in str(e) else "")
            raise ConfigError(f"{d.where}: {e}{hint}") from None
        try:
            recipe.check_manifest(manifest, f"{d.where}={d.path}")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def log_caption_report(cfg: Config, recipe: Recipe, tok: Tokenizer) -> None:
    """Rank 0, at start: what the tokenizer makes of the first REPORT_CAPTIONS training captions, in
    one line, plus a warning when [UNK] or captions over data.max_txt_len are common. A report only:
    data it cannot read is named in a warning, and the loaders count it as they meet it."""
    dirs = [d.train for d in cfg.data.datasets] if cfg.data.datasets else [cfg.data.train]
    per_dataset = -(-REPORT_CAPTIONS // len(dirs))
    captions: list[str] = []
    try:
        for path in dirs:
            captions += shard_captions(run_manifest(cfg, recipe, path).shards, per_dataset, cfg.storage.s3)
    except Exception as e:  # noqa: BLE001 - narrowed just below: only data errors are survivable
        if not is_data_error(e):
            raise
        log.warning("tokenizer report skipped: cannot read the training captions (%s: %s)", type(e).__name__, e)
        return
    stats = caption_stats(captions[:REPORT_CAPTIONS], tok, cfg.data.max_txt_len)
    if stats is None:
        log.warning("tokenizer report skipped: no usable caption at the start of the training shards")
        return
    action = "dropped, counted as filtered_length" if recipe.shard_format == FORMAT else "truncated"
    line, warnings = report_lines(stats, tok.describe(), action)
    log.info(line)
    for warning in warnings:
        log.warning(warning)


def setup_logging(info: DistInfo) -> None:
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def resolve_run_dir(cfg: Config) -> Config:
    """Fill `{now}` in train.run_dir with rank 0's time, so all ranks agree."""
    if "{now}" not in cfg.train.run_dir:
        return cfg
    now = all_gather_objects(time.strftime("%Y%m%d-%H%M%S"))[0]
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, run_dir=cfg.train.run_dir.replace("{now}", now)))


def build_train_loaders(cfg: Config, recipe: Recipe, tok, layout: BatchLayout, rank: int,
                        positions: dict) -> dict[str, ResumableTaskLoader]:
    """One loader per mix key; the key (not the task) names its RNG streams, so two
    datasets' MLM loaders draw different masks."""
    mine = range(rank * layout.grad_accum, (rank + 1) * layout.grad_accum)
    d = cfg.data
    loaders = {}
    for entry in task_mix(cfg):
        datasets = []
        for source in entry.sources:
            manifest = run_manifest(cfg, recipe, source.train)
            datasets.append(DatasetShards.from_manifest(source.name, manifest, source.weight))
        spec = StreamSpec(datasets=tuple(datasets), task=entry.key, seed=cfg.train.seed,
                          n_streams=layout.n_streams, batch_size=layout.micro_batch_size,
                          shuffle_buffer=d.shuffle_buffer, max_txt_len=d.max_txt_len,
                          parts=max(1, d.num_workers), resampled=d.resampled, s3=cfg.storage.s3,
                          limits=d.decode_limits(cfg.precision.dtype), verify_sha256=d.verify_sha256,
                          **recipe.stream_options())
        try:
            dataset = TaskBatches(spec, tok, recipe.collate(entry.task, tok), mine, positions.get(entry.key))
        except ValueError as e:  # positions that do not fit this run: one line, exit 2
            raise ConfigError(str(e)) from None
        loaders[entry.key] = ResumableTaskLoader(dataset, d.num_workers, seed=cfg.train.seed,
                                                 pin_memory=uses_cuda() and d.num_workers > 0)
    return loaders


def read_val_splits(cfg: Config, recipe: Recipe, tok, skipped: dict[str, int]) -> dict[str, tuple]:
    """Every held-out split, read whole on this rank (no collectives): key -> (task, the recipe's
    reading of it). Damaged, missing or bad data is skipped and counted into `skipped` alike on
    every rank; what cannot be read at all (an invalid manifest, S3 past its retry budget, no
    usable sample) raises."""
    splits = {}
    for e in task_mix(cfg):
        for key, source in e.val_keys():
            manifest = run_manifest(cfg, recipe, source.val)
            splits[key] = (e.task, recipe.read_val_split(manifest.shards, tok, skipped))
    return splits
