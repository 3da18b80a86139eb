"""`vlpt pretrain`: the training run from a resolved config to a summary."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from data.collate import collate_itm, collate_itm_hard, collate_mlm, collate_mrm
from data.collate_albef import collate_albef
from data.loader import (ResumableTaskLoader, StreamSpec, TaskBatches, add_counts, iter_split, merge_states,
                         validation_batches)
from data.shards import FORMAT, PIXEL_FORMAT, read_manifest
from data.sources import DatasetShards, NoUsableData
from data.storage import is_s3
from data.tokenizer import load_tokenizer
from trainer import checkpoint as ckpt
from trainer.albef_step import albef_train_step
from trainer.config import Config, config_to_yaml
from trainer.config_loader import ConfigError, flatten, to_dict
from trainer.checkpoint_s3 import download_checkpoint, remote_latest, upload_checkpoint
from trainer.distributed import DistInfo, all_gather_objects, setup_distributed
from trainer.engine import BatchLayout, batch_layout, build_engine
from trainer.errors import RunAborted, RunStopped
from trainer.models.albef import AlbefTeacher
from trainer.models.pretrain import build_model
from trainer.objectives import build_objectives
from trainer.objectives.albef import alpha_at
from trainer.preemption import StopRequest
from trainer.progress import Progress
from trainer.retrieval import load_retrieval_set, retrieval_metrics
from trainer.run_lock import hold_run_lock
from trainer.steps import draw_task, evaluate, train_step
from trainer.task_mix import mix_ratios, task_mix, task_of
from trainer.summary import mlm_loss_drop, print_summary
from trainer.tracking import Tracker

log = logging.getLogger("vlpt")


@dataclass
class RunState:
    step: int = 0
    positions: dict[str, dict] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    data_skipped: dict[str, int] = field(default_factory=dict)
    """Bad training samples by reason over all ranks, up to the checkpoint this run resumed from."""
    data_seen: int = 0
    """Raw training samples read over all ranks, up to that checkpoint."""
    nonfinite_steps: int = 0
    """Optimizer steps skipped because the loss was NaN/inf on some rank."""
    nonfinite_in_a_row: int = 0


@dataclass(frozen=True)
class DataCounts:
    skipped: dict[str, int]
    seen: int
    retries: dict[str, int] = field(default_factory=dict)
    """S3 retries by reason, this process's run only (not carried over a resume)."""

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    @property
    def per_1000(self) -> float:
        return 1000.0 * self.bad / max(self.seen, 1)


def data_counts(loaders: dict, state: RunState) -> DataCounts:
    """Collective. The run's bad/seen sample totals: the resumed-from totals plus what
    every task loader of every rank has consumed since this process started."""
    local_skipped: dict[str, int] = {}
    local_retries: dict[str, int] = {}
    local_seen = 0
    for loader in loaders.values():
        add_counts(local_skipped, loader.skip_counts)
        add_counts(local_retries, loader.retries)
        local_seen += loader.seen
    skipped, seen, retries = dict(state.data_skipped), state.data_seen, {}
    for rank_skipped, rank_seen, rank_retries in all_gather_objects((local_skipped, local_seen, local_retries)):
        add_counts(skipped, rank_skipped)
        add_counts(retries, rank_retries)
        seen += rank_seen
    return DataCounts({k: skipped[k] for k in sorted(skipped) if skipped[k]}, seen, dict(sorted(retries.items())))


def data_metrics(counts: DataCounts) -> dict[str, float]:
    return {**{f"data/skipped_{k}": float(v) for k, v in counts.skipped.items()},
            "data/skipped": float(counts.bad), "data/seen": float(counts.seen),
            "data/skipped_per_1000": counts.per_1000,
            **{f"data/{k}": float(v) for k, v in counts.retries.items()}}


def bad_rate_error(cfg: Config, counts: DataCounts) -> Optional[str]:
    """The one-line abort message when the bad-sample limit is exceeded, else None.
    Decided from the all-gathered totals, so every rank agrees."""
    limit = cfg.data.max_bad_per_1000
    if counts.seen < max(cfg.data.min_samples_for_bad_rate, 1) or counts.per_1000 <= limit:
        return None
    reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(counts.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"data: {counts.bad:,} of {counts.seen:,} samples were bad ({counts.per_1000:.1f} per 1,000 > "
            f"data.max_bad_per_1000={limit:g}): {reasons}; fix the shards or raise data.max_bad_per_1000")


def check_precision(cfg: Config, info: DistInfo) -> None:
    """fp16 needs the accelerator's fp16 support. DeepSpeed's CPU accelerator claims it only
    with mkldnn fp16 (AVX512-FP16 / AMX), yet torch runs fp16 on any CPU in software: there
    we let DeepSpeed go ahead, so a laptop can check an fp16 config (loss scaling, overflow
    skips, ZeRO) before it goes to GPUs."""
    if cfg.precision.dtype != "fp16":
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


def check_inputs(cfg: Config) -> None:
    """Fail before any heavy work when a file the config names is missing."""
    need = {"data.vocab": cfg.data.vocab}
    for d in dataset_dirs(cfg):
        if not is_s3(d.path):  # remote manifests are checked when read
            need[d.where] = os.path.join(d.path, "manifest.json")
    for key in ("init_from_bert", "init_from_uniter", "init_from_vit"):
        if getattr(cfg.model, key, None):
            need[f"model.{key}"] = getattr(cfg.model, key)
    for key, path in need.items():
        if not os.path.exists(path):
            hint = " (make it with `vlpt demo-data`)" if key.startswith("data.") and "demo" in path else ""
            raise ConfigError(f"{key}: file not found: {path}{hint}")


@dataclass(frozen=True)
class DatasetDir:
    where: str
    """The config key naming it, for error messages."""
    path: str


def dataset_dirs(cfg: Config) -> list[DatasetDir]:
    """Every shard directory the run reads (train and val of each dataset)."""
    if not cfg.data.datasets:
        named = [("data.train", cfg.data.train), ("data.val", cfg.data.val)]
    else:
        named = [(f"data.datasets.{d.name}.{split}", getattr(d, split))
                 for d in cfg.data.datasets for split in ("train", "val")]
    return [DatasetDir(where, path) for where, path in named if path]


def is_albef(cfg: Config) -> bool:
    return cfg.model.arch == "albef"


def shard_format(cfg: Config) -> str:
    """ALBEF reads pictures, UNITER region features."""
    return PIXEL_FORMAT if is_albef(cfg) else FORMAT


def collate_for(task: str, cfg: Config, tok):
    """(samples, rng) -> batch for `task`; a partial, so DataLoader workers can pickle it."""
    if task == "albef":
        return functools.partial(collate_albef, tok=tok, pixels=cfg.data.pixels, max_txt_len=cfg.data.max_txt_len,
                                 mlm_prob=cfg.data.mlm_prob)
    if task == "mlm":
        return functools.partial(collate_mlm, tok=tok, mlm_prob=cfg.data.mlm_prob)
    if task == "itm":
        return functools.partial(collate_itm, tok=tok, neg_prob=cfg.data.itm_neg_prob)
    if task == "itm-hard":
        return functools.partial(collate_itm_hard, tok=tok, candidates=cfg.data.itm_hard_candidates)
    # MRFR, MRC and MRC-kl share the region masking; only their losses differ.
    return functools.partial(collate_mrm, tok=tok, mrm_prob=cfg.data.mrm_prob, task=task)


def build_train_loaders(cfg: Config, tok, layout: BatchLayout, rank: int, positions: dict,
                        img_dim: int) -> dict[str, ResumableTaskLoader]:
    """One loader per mix key; the key (not the task) names its RNG streams, so two
    datasets' MLM loaders draw different masks."""
    mine = range(rank * layout.grad_accum, (rank + 1) * layout.grad_accum)
    d = cfg.data
    loaders = {}
    for entry in task_mix(cfg):
        datasets = []
        for source in entry.sources:
            manifest = read_manifest(source.train, shard_format(cfg), s3=d.s3, allow_outside=d.allow_outside_shards)
            datasets.append(DatasetShards.from_manifest(source.name, manifest, source.weight))
        spec = StreamSpec(datasets=tuple(datasets), task=entry.key, seed=cfg.train.seed,
                          n_streams=layout.n_streams, batch_size=layout.micro_batch_size,
                          shuffle_buffer=d.shuffle_buffer, max_txt_len=d.max_txt_len, img_dim=img_dim,
                          parts=max(1, d.num_workers), resampled=d.resampled, token_budget=d.token_budget,
                          s3=d.s3, modality="pixels" if is_albef(cfg) else "regions",
                          limits=d.decode_limits(cfg.precision.dtype), verify_sha256=d.verify_sha256)
        try:
            dataset = TaskBatches(spec, tok, collate_for(entry.task, cfg, tok), mine, positions.get(entry.key))
        except ValueError as e:  # positions that do not fit this run: one line, exit 2
            raise ConfigError(str(e)) from None
        loaders[entry.key] = ResumableTaskLoader(dataset, d.num_workers, seed=cfg.train.seed)
    return loaders


def read_val_splits(cfg: Config, tok, skipped: dict[str, int]) -> dict[str, tuple]:
    """Every held-out split, read whole on this rank (no collectives): key -> (task, raw samples)
    or, for ALBEF, (task, RetrievalSet). Damaged, missing or bad data is skipped and counted into
    `skipped` alike on every rank; what cannot be read at all (an invalid manifest, S3 past its
    retry budget, no usable sample) raises."""
    splits = {}
    for e in task_mix(cfg):
        for key, source in e.val_keys():
            manifest = read_manifest(source.val, shard_format(cfg), s3=cfg.data.s3,
                                     allow_outside=cfg.data.allow_outside_shards)
            if is_albef(cfg):
                data = load_retrieval_set(manifest.shards, tok, cfg.data.max_txt_len, cfg.data.s3,
                                          cfg.data.decode_limits(), skipped=skipped)
            else:
                data = list(iter_split(manifest.shards, cfg.data.s3, skipped, cfg.data.max_member_bytes))
            splits[key] = (e.task, data)
    return splits


def build_val_batches(cfg: Config, tok, info: DistInfo, img_dim: int, splits: dict[str, tuple],
                      skipped: dict[str, int]) -> dict[str, Iterable[dict]]:
    """This rank's batches of each split read by read_val_splits; bad samples of its share go to `skipped`."""
    return {key: validation_batches((), tok, collate_for(task, cfg, tok), task=key, seed=cfg.train.seed,
                                    rank=info.rank, world=info.world_size, batch_size=cfg.data.val_batch_size,
                                    max_txt_len=cfg.data.max_txt_len, img_dim=img_dim, s3=cfg.data.s3,
                                    skipped=skipped, limits=cfg.data.decode_limits(cfg.precision.dtype), raws=raws)
            for key, (task, raws) in splits.items()}


def validate_against_data(cfg: Config, tok) -> int:
    """Check the vocabulary and every manifest against the model; returns the region
    feature width (0 for ALBEF's pixels)."""
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but {cfg.data.vocab} has "
                          f"{tok.vocab_size} tokens; set model.vocab_size={tok.vocab_size}")
    for d in dataset_dirs(cfg):
        try:
            manifest = read_manifest(d.path, shard_format(cfg), s3=cfg.data.s3,
                                     allow_outside=cfg.data.allow_outside_shards)
        except ValueError as e:  # missing, unreadable or invalid: one line naming the key
            hint = (" (model.arch=albef reads picture shards: `vlpt demo-data --pixels`, `vlpt shards coco`)"
                    if is_albef(cfg) and "format" in str(e) else "")
            raise ConfigError(f"{d.where}: {e}{hint}") from None
        if is_albef(cfg):
            continue
        if manifest.img_dim != cfg.model.img_dim:
            raise ConfigError(f"model.img_dim={cfg.model.img_dim} but {d.where}={d.path} has "
                              f"{manifest.img_dim}-d region features")
        if manifest.label_dim != cfg.model.img_label_dim:
            raise ConfigError(f"model.img_label_dim={cfg.model.img_label_dim} but {d.where}={d.path} "
                              f"has {manifest.label_dim} soft-label classes")
    return 0 if is_albef(cfg) else cfg.model.img_dim


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


def check_fresh_start(run_dir: str, resume: bool) -> None:
    if not resume and ckpt.list_complete(ckpt.checkpoint_root(run_dir)):
        raise ConfigError(f"train.run_dir={run_dir} already holds checkpoints and train.resume is false; "
                          "set --train.resume=true to continue that run or choose a new train.run_dir")


def pretrain(cfg: Config) -> dict:
    check_inputs(cfg)
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    setup_logging(info)
    check_precision(cfg, info)
    cfg = resolve_run_dir(cfg)
    run_dir = os.path.abspath(cfg.train.run_dir)
    with hold_run_lock(run_dir, info):  # one run per run dir, released however the run ends
        check_fresh_start(run_dir, cfg.train.resume)
        config_yaml = config_to_yaml(cfg)
        if info.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(config_yaml)
            print(f"resolved config (saved to {run_dir}/config.yaml):\n{config_yaml}", flush=True)
        tok = load_tokenizer(cfg.data.vocab)
        img_dim = validate_against_data(cfg, tok)

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model = build_model(cfg.model)
        layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, info.world_size)
        replicated = {}
        if is_albef(cfg):
            replicated["teacher"] = build_teacher(model, layout, info.device)
        else:
            model.objectives = build_objectives(cfg.wra)
        total_steps = cfg.optim.total_steps or cfg.train.max_steps
        engine, _ = build_engine(model, cfg.optim, cfg.parallel, cfg.precision, layout, total_steps,
                                 info.device)

        state, rng = resume(cfg, engine, run_dir, info, replicated)
        loaders = build_train_loaders(cfg, tok, layout, info.rank, state.positions, img_dim)
        tracker = Tracker(cfg.tracking, run_dir, enabled=info.is_main, resume_run_id=state.mlflow_run_id)
        if info.is_main and state.mlflow_run_id is None:
            tracker.log_params(flatten(to_dict(cfg)))
            tracker.log_params({"run.world_size": info.world_size, "run.grad_accum": layout.grad_accum,
                                "run.global_batch_size": layout.global_batch_size})
            tracker.log_artifact(os.path.join(run_dir, "config.yaml"))
        # Each rank gets its own dropout stream; restored last so nothing above consumes it.
        torch.manual_seed(cfg.train.seed * 1000 + info.rank + 1)
        if rng is not None:
            ckpt.set_rng_state(rng)
        step_fn = make_step_fn(cfg, engine, loaders, layout, info, replicated.get("teacher"))
        return run_training(cfg, info, engine, loaders, layout, tracker, state, tok, img_dim, config_yaml,
                            step_fn, replicated)


def build_teacher(model, layout: BatchLayout, device: torch.device) -> AlbefTeacher:
    """ALBEF's momentum model and queues, copied from the student before the engine wraps it."""
    teacher = AlbefTeacher(model)
    try:
        teacher.queues.check_batch(layout.global_batch_size)
    except ValueError as e:
        raise ConfigError(f"model.queue_size: {e}") from None
    return teacher.to(device)


def make_step_fn(cfg: Config, engine, loaders: dict, layout: BatchLayout, info: DistInfo,
                 teacher: Optional[AlbefTeacher]):
    """(state, mix key) -> StepStats of one optimizer step."""
    if teacher is None:
        return lambda state, key: train_step(engine, loaders[key], task_of(key), layout, info.device)
    warmup = cfg.model.alpha_warmup_steps
    if warmup is None:  # one epoch of the training data, as ALBEF
        samples = sum(loader.dataset.spec.total_samples for loader in loaders.values())
        warmup = -(-samples // layout.global_batch_size)
    return lambda state, key: albef_train_step(
        engine, teacher, loaders[key], layout, info.device, step=state.step, seed=cfg.train.seed,
        alpha=alpha_at(cfg.model.alpha, state.step, warmup), precision=cfg.precision.dtype,
        update_teacher=state.nonfinite_in_a_row == 0)


def resume(cfg: Config, engine, run_dir: str, info: DistInfo,
           replicated: Optional[dict] = None) -> tuple[RunState, Optional[dict]]:
    """Collective. The run state and this rank's RNG from the newest usable checkpoint (fetched
    from train.checkpoint_s3 first when run_dir has none), or a fresh state and None."""
    if not cfg.train.resume:
        return RunState(), None
    fetched, refused = False, None
    if info.is_main:
        try:
            fetched = fetch_from_s3(cfg, run_dir)
        except ValueError as e:  # a hostile or incomplete mirror: every rank stops with its line
            refused = str(e)
    from_s3, refused = all_gather_objects((fetched, refused))[0]
    if refused:
        raise ConfigError(refused)
    try:
        found = ckpt.load_newest_usable(engine, run_dir, info, replicated)
    except ValueError as e:  # an unsafe checkpoint, or none usable: one line, exit 2
        raise ConfigError(str(e)) from None
    if found is None:
        return RunState(), None
    tag, saved, rng = found
    run_id = saved.get("mlflow_run_id")
    if from_s3 and not cfg.tracking.uri:
        run_id = None  # its MLflow store was in the run folder the checkpoint came from
    state = RunState(saved["step"], saved["positions"], saved["task_counts"], run_id,
                     {k: int(v) for k, v in saved.get("data_skipped", {}).items()},
                     int(saved.get("data_seen", 0)), int(saved.get("nonfinite_steps", 0)),
                     int(saved.get("nonfinite_in_a_row", 0)))
    log.info("resumed from %s at step %d", tag, state.step)
    return state, rng


def fetch_from_s3(cfg: Config, run_dir: str) -> bool:
    """Rank 0: download the newest upload when run_dir has no checkpoint; True if it did."""
    url, root = cfg.train.checkpoint_s3, ckpt.checkpoint_root(run_dir)
    if not url or os.path.isfile(os.path.join(root, "latest")):
        return False
    tag = remote_latest(url, cfg.data.s3)
    if tag is None:
        return False
    download_checkpoint(url, cfg.data.s3, tag, root)
    return True


def run_training(cfg, info, engine, loaders, layout, tracker, state, tok, img_dim, config_yaml, step_fn,
                 replicated: dict) -> dict:
    run_dir = os.path.abspath(cfg.train.run_dir)
    last_step = min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)
    progress = Progress(enabled=info.is_main, start=state.step, total=cfg.train.max_steps,
                        log_every=cfg.train.log_every, bar=cfg.train.progress)
    t0, start_step, ratios = time.time(), state.step, mix_ratios(cfg)
    stop = StopRequest().install()
    try:
        while state.step < last_step:
            key = draw_task(cfg.train.seed, state.step, ratios)
            try:
                result = step_fn(state, key)
            except NoUsableData as e:  # a dataset with nothing readable left: one line, exit 2
                progress.close()
                tracker.finish("FAILED")
                raise ConfigError(str(e)) from None
            state.step += 1
            state.task_counts[key] = state.task_counts.get(key, 0) + 1
            stats = count_nonfinite(cfg, state, result, key, tracker, progress)
            record = {"lr": engine.get_lr()[0], **{f"{key}_{k}": v for k, v in stats.items()}}
            tracker.log_metrics(record, state.step, task=key)
            if state.step % cfg.train.log_every == 0:
                check_data(cfg, data_counts(loaders, state), tracker, progress, state.step)
            progress.update(state.step, key, stats, layout.global_batch_size)
            if cfg.train.val_every and state.step % cfg.train.val_every == 0 and state.step < last_step:
                run_validation(cfg, info, engine, tok, img_dim, tracker, progress, state.step)
            if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < last_step:
                save(cfg, info, engine, loaders, state, tracker, config_yaml, replicated)
            if stop.any_rank(info.device):
                save_and_stop(cfg, info, engine, loaders, state, tracker, config_yaml, progress, stop, replicated)
    finally:
        stop.uninstall()
    elapsed = time.time() - t0
    counts = data_counts(loaders, state)
    check_data(cfg, counts, tracker, progress, state.step)
    progress.close()
    # Saved first: a failing final validation must not cost the steps since the last checkpoint.
    path = save(cfg, info, engine, loaders, state, tracker, config_yaml, replicated)
    val_metrics = run_validation(cfg, info, engine, tok, img_dim, tracker, progress, state.step)
    summary = {"steps": state.step, "steps_this_run": state.step - start_step, "seconds": elapsed,
               "samples_per_s": (state.step - start_step) * layout.global_batch_size / max(elapsed, 1e-9),
               "checkpoint": path, "mlflow_run_id": tracker.run_id,
               "mlflow_ui": tracker.ui_command() if cfg.tracking.enabled else None,
               "task_counts": state.task_counts, "world_size": layout.world_size,
               "grad_accum": layout.grad_accum, "global_batch_size": layout.global_batch_size,
               **val_metrics}
    if state.nonfinite_steps:
        summary["nonfinite_steps"] = state.nonfinite_steps
    if counts.bad:
        summary.update(data_skipped=counts.skipped, data_seen=counts.seen,
                       data_skipped_per_1000=counts.per_1000)
    if info.is_main:
        summary.update(mlm_loss_drop(os.path.join(run_dir, "metrics.jsonl")))
        final = {k: v for k, v in summary.items() if isinstance(v, float) and not k.startswith("val/")}
        tracker.log_metrics(final, state.step)
        tracker.log_artifact(os.path.join(path, "config.yaml"), "final_checkpoint")
        tracker.log_artifact(os.path.join(path, ckpt.STATE_FILE), "final_checkpoint")
        tracker.set_tag("final_checkpoint", path)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print_summary(summary, run_dir)
    tracker.finish()
    return summary


def count_nonfinite(cfg, state: RunState, result, key: str, tracker, progress) -> dict[str, float]:
    """Count a skipped step (the same on every rank: the loss was reduced over ranks) and end
    the run after `train.max_consecutive_nonfinite` in a row. Returns the stats to log:
    none of a skipped step's NaN/inf values, only the running count."""
    if not result.skipped:
        state.nonfinite_in_a_row = 0
        return result.means
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    limit = cfg.train.max_consecutive_nonfinite
    first = state.step - state.nonfinite_in_a_row + 1
    progress.write(f"step {state.step}: non-finite {key} loss on some rank; step skipped "
                   f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in this run)")
    tracker.log_metrics({"nonfinite_steps": float(state.nonfinite_steps)}, state.step)
    if state.nonfinite_in_a_row >= limit:
        progress.close()
        tracker.finish("FAILED")
        raise RunAborted(f"training diverged: the loss was NaN/inf in {limit} optimizer steps in a row "
                         f"(steps {first}-{state.step}, train.max_consecutive_nonfinite={limit}); resume "
                         "from the latest checkpoint with a lower optim.lr, or try fp32 / bf16")
    return {}


def save_and_stop(cfg, info, engine, loaders, state, tracker, config_yaml, progress, stop: StopRequest,
                  replicated: dict) -> None:
    """A rank got SIGTERM / SIGINT: checkpoint this step on every rank, then end the run."""
    progress.close()
    path = save(cfg, info, engine, loaders, state, tracker, config_yaml, replicated)
    tracker.finish("KILLED")
    raise RunStopped(f"stopped by {stop.name} after step {state.step}; checkpoint {path}; the same command "
                     "resumes from it", stop.exit_code)


def check_data(cfg, counts: DataCounts, tracker, progress, step: int) -> None:
    """Log the data counters; over the bad-sample limit, end the run with a ConfigError
    (on every rank at the same step: the counts are global)."""
    tracker.log_metrics(data_metrics(counts), step)
    progress.skipped, progress.retries = counts.bad, sum(counts.retries.values())
    error = bad_rate_error(cfg, counts)
    if error:
        progress.close()
        tracker.finish("FAILED")
        raise ConfigError(error)


def run_validation(cfg, info, engine, tok, img_dim, tracker, progress, step) -> dict:
    """Collective. The validation metrics, plus "val_data_skipped" ({reason: n} over all ranks)
    when held-out data was skipped. Held-out data that cannot be read on some rank skips this
    validation on every rank with one warning line: it never ends the run."""
    skipped: dict[str, int] = {}
    try:
        splits, error = read_val_splits(cfg, tok, skipped), None
    except Exception as e:  # noqa: BLE001 - narrowed just below: only data errors are survivable
        if not is_data_error(e):
            raise
        splits, error = {}, f"{type(e).__name__}: {e}"
    errors = [e for e in all_gather_objects(error) if e]  # every rank takes the same path
    if errors:
        progress.write(f"validation @ step {step} skipped: the held-out data cannot be read: {errors[0]}")
        return {}
    if is_albef(cfg):
        metrics = albef_validation(cfg, info, engine, splits)
    else:
        sample_skips: dict[str, int] = {}
        batches = build_val_batches(cfg, tok, info, img_dim, splits, sample_skips)
        metrics = evaluate(engine, batches, info.device) if batches else {}
        for rank_skips in all_gather_objects(sample_skips):  # each rank decoded its own share
            add_counts(skipped, rank_skips)
    return report_validation(metrics, dict(sorted(skipped.items())), tracker, progress, step)


def is_data_error(e: Exception) -> bool:
    """Errors of reading held-out data: a validation can be skipped for them."""
    return isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith("botocore")


def report_validation(metrics: dict[str, float], skipped: dict[str, int], tracker, progress, step: int) -> dict:
    if skipped:
        tracker.log_metrics({f"val_data/skipped_{k}": float(v) for k, v in skipped.items()}, step)
        progress.write(f"validation @ step {step}: skipped held-out data: "
                       + ", ".join(f"{k}={v:,}" for k, v in skipped.items()))
    if metrics:
        tracker.log_metrics(metrics, step)
        progress.write("validation @ step %d: %s" % (step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))))
    return {**metrics, **({"val_data_skipped": skipped} if skipped else {})}


def albef_validation(cfg, info, engine, splits: dict[str, tuple]) -> dict[str, float]:
    """Retrieval (ITC top-k re-scored by ITM) on each held-out split; keys `val/<key>_t2i_r1`."""
    metrics = {}
    for key, (_, data) in splits.items():
        found = retrieval_metrics(engine, data, cfg.data.pixels, k=cfg.model.k_test,
                                  batch_size=cfg.data.val_batch_size, device=info.device, rank=info.rank,
                                  world=info.world_size)
        metrics.update({f"val/{key}_{k}": v for k, v in found.items()})
    return metrics


def save(cfg, info, engine, loaders, state, tracker, config_yaml, replicated: dict) -> str:
    # Each rank knows only its own streams' positions: gather them into one global map.
    gathered = all_gather_objects({t: l.state_dict() for t, l in loaders.items()})
    positions = {task: merge_states([per_rank[task] for per_rank in gathered]) for task in loaders}
    counts = data_counts(loaders, state)
    trainer_state = {"step": state.step, "positions": positions, "task_counts": state.task_counts,
                     "mlflow_run_id": tracker.run_id if info.is_main else None,
                     "data_skipped": counts.skipped, "data_seen": counts.seen,
                     "nonfinite_steps": state.nonfinite_steps, "nonfinite_in_a_row": state.nonfinite_in_a_row}
    path = ckpt.save_checkpoint(engine, os.path.abspath(cfg.train.run_dir), state.step, trainer_state,
                                config_yaml, cfg.train.keep_last, info, replicated)
    if info.is_main and cfg.train.checkpoint_s3:
        upload_checkpoint(os.path.dirname(path), os.path.basename(path), cfg.train.checkpoint_s3, cfg.data.s3,
                          cfg.train.keep_last)
    return path
