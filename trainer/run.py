"""`vlpt pretrain`: a training run, from a resolved config to a summary (docs/design.md, "The run")."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from data.loader import add_counts, merge_states
from data.sources import NoUsableData
from trainer import checkpoint as ckpt
from trainer.checkpoint_files import STATE_FILE, checkpoint_root
from trainer.checkpoint_s3 import download_checkpoint, remote_latest, upload_checkpoint
from trainer.compile import compile_regions
from trainer.config import Config, config_to_yaml
from trainer.config_files import ConfigError
from trainer.config_loader import flatten, to_dict
from trainer.data_health import DataCounts, bad_rate_error, data_counts, data_metrics, is_data_error
from trainer.distributed import DistInfo, all_gather_objects, setup_distributed, teardown
from trainer.engine import BatchLayout, batch_layout, build_engine
from trainer.errors import RunAborted, RunStopped
from trainer.preemption import StopRequest
from trainer.progress import Progress
from trainer.recipes.base import Recipe, StepContext
from trainer.run_lock import hold_run_lock
from trainer.run_dir import agree_resume_mode, nothing_to_resume
from trainer.run_setup import check_inputs, check_precision, checked_recipe, resolve_run_dir, setup_logging
from trainer.step import StepStats, optimizer_step
from trainer.step_timer import StepTimer
from trainer.summary import mlm_loss_drop, print_summary
from trainer.task_mix import draw_task, mix_ratios, task_of
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

    @classmethod
    def from_saved(cls, saved: dict, run_id: Optional[str]) -> "RunState":
        return cls(saved["step"], saved["positions"], saved["task_counts"], run_id,
                   {k: int(v) for k, v in saved.get("data_skipped", {}).items()}, int(saved.get("data_seen", 0)),
                   int(saved.get("nonfinite_steps", 0)), int(saved.get("nonfinite_in_a_row", 0)))


def pretrain(cfg: Config) -> dict:
    check_inputs(cfg)
    joined = torch.distributed.is_initialized()  # a caller's group is the caller's to take down
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    setup_logging(info)
    check_precision(cfg.precision, info)
    cfg = resolve_run_dir(cfg)
    run_dir = os.path.abspath(cfg.train.run_dir)
    # The whole config is checked against the data before the run dir is made: a bad config leaves no folder.
    recipe, tok = checked_recipe(cfg)
    agree_resume_mode(run_dir, cfg.train.resume, cfg.train.checkpoint_s3, info)
    with hold_run_lock(run_dir, info):  # one run per run dir, released however the run ends
        config_yaml = config_to_yaml(cfg)
        if info.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(config_yaml)
            print(f"resolved config (saved to {run_dir}/config.yaml):\n{config_yaml}", flush=True)
            recipe.report_data(tok)
        summary = _build_and_train(cfg, recipe, info, tok, config_yaml)
    if not joined:
        teardown()  # after the run is gone: teardown collects it before the group goes down
    return summary


def _build_and_train(cfg: Config, recipe: Recipe, info: DistInfo, tok, config_yaml: str) -> dict:
    """The run, alive only inside this call (pretrain collects it before taking the group down)."""
    run = Run.build(cfg, recipe, info, tok, config_yaml)
    run.open(run.resume())
    return run.train()


class Run:
    """One training run: its config, ranks, recipe, engine, loaders, tracker, state and folder."""

    def __init__(self, cfg: Config, recipe: Recipe, info: DistInfo, engine, layout: BatchLayout, tok,
                 config_yaml: str) -> None:
        self.cfg, self.recipe, self.info, self.engine, self.layout = cfg, recipe, info, engine, layout
        self.timer = StepTimer.off()
        self.tok, self.config_yaml = tok, config_yaml
        self.run_dir = os.path.abspath(cfg.train.run_dir)
        self.state = RunState()
        self.loaders: dict = {}
        self.tracker: Optional[Tracker] = None
        self.progress: Optional[Progress] = None

    @classmethod
    def build(cls, cfg: Config, recipe: Recipe, info: DistInfo, tok, config_yaml: str) -> "Run":
        """The model (same initial weights on every rank), the recipe's state beside it, the engine."""
        torch.manual_seed(cfg.train.seed)
        try:
            model = recipe.build_model()
        except ValueError as e:  # init_from_* that does not fit the model: one line naming the file
            raise ConfigError(str(e)) from None
        layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, info.world_size)
        try:
            recipe.attach(model, layout, info.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.train.compile:
            compile_regions(model, recipe)
        total_steps = cfg.optim.total_steps or cfg.train.max_steps
        engine, _ = build_engine(model, cfg.optim, cfg.parallel, cfg.precision, layout, total_steps, info.device,
                                 lr_mul=recipe.lr_multipliers())
        return cls(cfg, recipe, info, engine, layout, tok, config_yaml)

    def open(self, rng: Optional[dict]) -> None:
        """Loaders at the resumed positions, the tracker, and each rank's own RNG for dropout."""
        cfg, info, layout = self.cfg, self.info, self.layout
        self.loaders = self.recipe.train_loaders(self.tok, layout, info.rank, self.state.positions)
        self.recipe.on_loaders(self.loaders, layout)
        self.tracker = Tracker(cfg.tracking, self.run_dir, enabled=info.is_main, resume_run_id=self.state.mlflow_run_id)
        if info.is_main and self.state.mlflow_run_id is None:
            self.tracker.log_params(flatten(to_dict(cfg)))
            self.tracker.log_params({"run.world_size": info.world_size, "run.grad_accum": layout.grad_accum,
                                     "run.global_batch_size": layout.global_batch_size})
            self.tracker.log_artifact(os.path.join(self.run_dir, "config.yaml"))
        # Each rank gets its own dropout stream; restored last so nothing above consumes it.
        torch.manual_seed(cfg.train.seed * 1000 + info.rank + 1)
        if rng is not None:
            ckpt.set_rng_state(rng)

    def resume(self) -> Optional[dict]:
        """Collective. The run state from the newest usable checkpoint (fetched from
        train.checkpoint_s3 first when run_dir has none); returns this rank's RNG state, or None."""
        if self.cfg.train.resume == "never":  # checked before: run_dir holds no checkpoint
            return None
        fetched, refused = False, None
        if self.info.is_main:
            try:
                fetched = self.fetch_from_s3()
            except ValueError as e:  # a hostile or incomplete mirror: every rank stops with its line
                refused = str(e)
        from_s3, refused = all_gather_objects((fetched, refused))[0]
        if refused:
            raise ConfigError(refused)
        try:
            found = ckpt.load_newest_usable(self.engine, self.run_dir, self.info, self.recipe.replicated())
        except ValueError as e:  # an unsafe checkpoint, or none usable: one line, exit 2
            raise ConfigError(str(e)) from None
        if found is None and self.cfg.train.resume == "must":
            raise ConfigError(nothing_to_resume(self.run_dir, self.cfg.train.checkpoint_s3))
        if found is None:
            return None
        tag, saved, rng = found
        run_id = saved.get("mlflow_run_id")
        if from_s3 and not self.cfg.tracking.uri:
            run_id = None  # its MLflow store was in the run folder the checkpoint came from
        self.state = RunState.from_saved(saved, run_id)
        log.info("resumed from %s at step %d", tag, self.state.step)
        return rng

    def fetch_from_s3(self) -> bool:
        """Rank 0: download the newest upload when run_dir has no checkpoint; True if it did."""
        url, root = self.cfg.train.checkpoint_s3, checkpoint_root(self.run_dir)
        if not url or os.path.isfile(os.path.join(root, "latest")):
            return False
        tag = remote_latest(url, self.cfg.storage.s3)
        if tag is None:
            return False
        download_checkpoint(url, self.cfg.storage.s3, tag, root)
        return True

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        last_step = min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)
        self.progress = Progress(enabled=self.info.is_main, start=state.step, total=cfg.train.max_steps,
                                 log_every=cfg.train.log_every, bar=cfg.train.progress)
        self.timer = StepTimer(self.info.device)
        self.timer.watch_gradient_reduction(self.engine)
        t0, start_step, ratios = time.time(), state.step, mix_ratios(cfg)
        stop = StopRequest().install()
        try:
            while state.step < last_step:
                key = draw_task(cfg.train.seed, state.step, ratios)
                result = self.step(key, lambda: stop.signum is not None)
                self.log_step(key, result)
                more = state.step < last_step
                if cfg.train.val_every and state.step % cfg.train.val_every == 0 and more:
                    self.validate()
                if cfg.train.save_every and state.step % cfg.train.save_every == 0 and more:
                    self.save()
                if result.stop_requested:
                    self.stop(stop)
        finally:
            stop.uninstall()
        return self.finish(time.time() - t0, start_step)

    def step(self, key: str, stop_requested: Callable[[], bool] = lambda: False) -> StepStats:
        ctx = StepContext(self.state.step, self.cfg.train.seed, self.info.device,
                          after_skip=self.state.nonfinite_in_a_row > 0)
        try:
            return optimizer_step(self.engine, self.recipe, self.loaders[key], task_of(key), self.layout, ctx,
                                  self.timer, stop_requested)
        except NoUsableData as e:  # a dataset with nothing readable left: one line, exit 2
            self.end("FAILED")
            raise ConfigError(str(e)) from None

    def log_step(self, key: str, result: StepStats) -> None:
        state = self.state
        state.step += 1
        state.task_counts[key] = state.task_counts.get(key, 0) + 1
        stats = self.count_nonfinite(result, key)
        record = {"lr": self.engine.get_lr()[0], **{f"{key}_{k}": v for k, v in stats.items()}}
        if result.grad_norm is not None and not result.skipped:
            record["grad_norm"] = result.grad_norm
        times = self.timer.report() if state.step % self.cfg.train.log_every == 0 else {}
        record.update({f"time/{phase}_ms": ms for phase, ms in times.items()})
        self.tracker.log_metrics(record, state.step, task=key)
        if state.step % self.cfg.train.log_every == 0:
            self.check_data(self.data_counts())
        self.progress.update(state.step, key, stats, self.layout.global_batch_size, times)

    def end(self, status: str) -> None:
        """Close the progress bar and the tracker's run with `status` (an abnormal end)."""
        self.progress.close()
        self.tracker.finish(status)

    def count_nonfinite(self, result: StepStats, key: str) -> dict[str, float]:
        """Count a skipped step (the same on every rank: the loss and the gradient norm were reduced over ranks) and end
        the run after `train.max_consecutive_nonfinite` in a row. Returns the stats to log:
        none of a skipped step's NaN/inf values, only the running count."""
        state = self.state
        if not result.skipped:
            state.nonfinite_in_a_row = 0
            return result.means
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        limit = self.cfg.train.max_consecutive_nonfinite
        first = state.step - state.nonfinite_in_a_row + 1
        self.progress.write(f"step {state.step}: non-finite {key} loss or gradient on some rank; step skipped "
                            f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in this run)")
        self.tracker.log_metrics({"nonfinite_steps": float(state.nonfinite_steps)}, state.step)
        if state.nonfinite_in_a_row >= limit:
            self.end("FAILED")
            raise RunAborted(f"training diverged: the loss was NaN/inf in {limit} optimizer steps in a row "
                             f"(steps {first}-{state.step}, train.max_consecutive_nonfinite={limit}); resume "
                             "from the latest checkpoint with a lower optim.lr, or try fp32 / bf16")
        return {}

    def data_counts(self) -> DataCounts:
        """Collective. Bad/seen samples of the whole run so far, over all ranks."""
        return data_counts(self.loaders, self.state.data_skipped, self.state.data_seen)

    def check_data(self, counts: DataCounts) -> None:
        """Log the data counters; over the bad-sample limit, end the run with a ConfigError
        (on every rank at the same step: the counts are global)."""
        self.tracker.log_metrics(data_metrics(counts), self.state.step)
        self.progress.skipped, self.progress.retries = counts.bad, sum(counts.retries.values())
        error = bad_rate_error(self.cfg.data, counts)
        if error:
            self.end("FAILED")
            raise ConfigError(error)

    def validate(self) -> dict:
        """Collective. The recipe's validation metrics, plus "val_data_skipped" ({reason: n} over all
        ranks) when held-out data was skipped. Held-out data that cannot be read on some rank skips
        this validation on every rank with one warning line: it never ends the run."""
        step, skipped = self.state.step, {}
        try:
            splits, error = self.recipe.val_splits(self.tok, skipped), None
        except Exception as e:  # noqa: BLE001 - narrowed just below: only data errors are survivable
            if not is_data_error(e):
                raise
            splits, error = {}, f"{type(e).__name__}: {e}"
        errors = [e for e in all_gather_objects(error) if e]  # every rank takes the same path
        if errors:
            self.progress.write(f"validation @ step {step} skipped: the held-out data cannot be read: {errors[0]}")
            return {}
        if not splits:  # no held-out data configured: the same on every rank
            return self.report_validation({}, dict(sorted(skipped.items())))
        metrics = self.recipe.validate(self.engine, self.tok, splits, self.info, skipped)
        return self.report_validation(metrics, dict(sorted(skipped.items())))

    def report_validation(self, metrics: dict[str, float], skipped: dict[str, int]) -> dict:
        step = self.state.step
        if skipped:
            self.tracker.log_metrics({f"val_data/skipped_{k}": float(v) for k, v in skipped.items()}, step)
            self.progress.write(f"validation @ step {step}: skipped held-out data: "
                                + ", ".join(f"{k}={v:,}" for k, v in skipped.items()))
        if metrics:
            self.tracker.log_metrics(metrics, step)
            self.progress.write("validation @ step %d: %s" % (
                step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))))
        return {**metrics, **({"val_data_skipped": skipped} if skipped else {})}

    def save(self) -> str:
        """Collective. A checkpoint of this step (mirrored to train.checkpoint_s3 when set); its path."""
        state, info = self.state, self.info
        # Each rank knows only its own streams' positions: gather them into one global map.
        gathered = all_gather_objects({t: loader.state_dict() for t, loader in self.loaders.items()})
        positions = {task: merge_states([per_rank[task] for per_rank in gathered]) for task in self.loaders}
        counts = self.data_counts()
        trainer_state = {"step": state.step, "positions": positions, "task_counts": state.task_counts,
                         "mlflow_run_id": self.tracker.run_id if info.is_main else None,
                         "data_skipped": counts.skipped, "data_seen": counts.seen,
                         "nonfinite_steps": state.nonfinite_steps, "nonfinite_in_a_row": state.nonfinite_in_a_row}
        path = ckpt.save_checkpoint(self.engine, self.run_dir, state.step, trainer_state, self.config_yaml,
                                    self.cfg.train.keep_last, info, self.recipe.replicated())
        if info.is_main and self.cfg.train.checkpoint_s3:
            upload_checkpoint(os.path.dirname(path), os.path.basename(path), self.cfg.train.checkpoint_s3,
                              self.cfg.storage.s3, self.cfg.train.keep_last)
        return path

    def stop(self, stop: StopRequest) -> None:
        """A rank got SIGTERM / SIGINT: checkpoint this step on every rank, then end the run."""
        self.progress.close()
        path = self.save()
        self.tracker.finish("KILLED")
        raise RunStopped(f"stopped by {stop.name} after step {self.state.step}; checkpoint {path}; the same "
                         "command resumes from it", stop.exit_code)

    def finish(self, elapsed: float, start_step: int) -> dict:
        """The final save (first: a failing final validation must not cost the steps since the last
        checkpoint), the final validation, and the summary (summary.json, MLflow, the printed table)."""
        state, layout = self.state, self.layout
        counts = self.data_counts()
        self.check_data(counts)
        self.progress.close()
        path = self.save()
        summary = {"stage": self.cfg.stage, "steps": state.step, "steps_this_run": state.step - start_step,
                   "seconds": elapsed,
                   "samples_per_s": (state.step - start_step) * layout.global_batch_size / max(elapsed, 1e-9),
                   "checkpoint": path, "mlflow_run_id": self.tracker.run_id,
                   "mlflow_ui": self.tracker.ui_command() if self.cfg.tracking.enabled else None,
                   "task_counts": state.task_counts, "world_size": layout.world_size,
                   "grad_accum": layout.grad_accum, "global_batch_size": layout.global_batch_size,
                   **self.validate()}
        if state.nonfinite_steps:
            summary["nonfinite_steps"] = state.nonfinite_steps
        if counts.bad:
            summary.update(data_skipped=counts.bad_skipped, data_seen=counts.seen, data_skipped_per_1000=counts.per_1000)
        if counts.filtered:  # captions over data.max_txt_len (UNITER drops them): not bad input
            summary.update(data_filtered_length=counts.filtered, data_seen=counts.seen)
        if self.info.is_main:
            self.publish_summary(summary, path)
        self.tracker.finish()
        return summary

    def publish_summary(self, summary: dict, path: str) -> None:
        """Rank 0: summary.json, the final metrics and checkpoint in MLflow, the printed table."""
        summary.update(mlm_loss_drop(os.path.join(self.run_dir, "metrics.jsonl")))
        final = {k: v for k, v in summary.items() if isinstance(v, float) and not k.startswith("val/")}
        self.tracker.log_metrics(final, self.state.step)
        self.tracker.log_artifact(os.path.join(path, "config.yaml"), "final_checkpoint")
        self.tracker.log_artifact(os.path.join(path, STATE_FILE), "final_checkpoint")
        self.tracker.set_tag("final_checkpoint", path)
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print_summary(summary, self.run_dir)
