"""The resolved run config: one frozen dataclass per section, composed here.

Each builder receives only its own section (`build_uniter(cfg.model)`,
`build_deepspeed_config(cfg.optim, cfg.parallel, cfg.precision, ...)`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping, Optional

import yaml

from data.config import DataConfig
from trainer.config_files import ConfigError, load_yaml_with_includes, resolve_paths
from trainer.config_loader import apply_overrides, check_config_values, check_known_keys, from_dict, to_dict
from data.storage import S3Options
from trainer.finetune_config import FinetuneConfig
from trainer.models.config import AlbefConfig, ModelConfig
from trainer.objectives.itm import WraConfig
from trainer.recipes import DEFAULT_ARCH, recipe_class

if TYPE_CHECKING:
    import torch

MAX_STEPS = 10**9
"""Bound of every step count (max_steps, warmup, intervals): ~30 years at 1 step/s; a larger value
is a typo (1e29) that would otherwise overflow a schedule or a counter somewhere."""


def _check_step_counts(section: str, **counts: Optional[int]) -> None:
    for name, value in counts.items():
        if value is not None and not 0 <= value <= MAX_STEPS:
            raise ValueError(f"{section}.{name}={value} must be between 0 and {MAX_STEPS:,} steps")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate (UNITER-base: 5e-5)."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    """Applied to every weight except biases and LayerNorm parameters (as UNITER)."""
    impl: Literal["auto", "torch", "torch_fused", "deepspeed", "apex"] = "auto"
    """AdamW implementation; auto = apex FusedAdam if importable on GPU, else torch fused on GPU, torch on CPU."""
    schedule: Literal["linear", "cosine", "constant", "albef_epochs"] = "linear"
    """Linear warmup, then linear decay to 0 / cosine decay to min_lr / constant; `albef_epochs`: ALBEF's
    scheduler (docs/downstream.md, "ALBEF's learning-rate schedule"): in epoch 0 `warmup_lr` raised to `lr` in
    blocks of 100 steps over `warmup_steps`, then from epoch e = 1 on the cosine of e / epochs, per epoch."""
    warmup_steps: int = 10000
    total_steps: Optional[int] = None
    """Length of the schedule; None = train.max_steps."""
    min_lr: float = 0.0
    warmup_lr: Optional[float] = None
    """`albef_epochs`: the learning rate warm-up starts from (ALBEF's `warmup_lr`); None = lr."""
    epoch_steps: Optional[int] = None
    """`albef_epochs`: optimizer steps in an epoch (ALBEF's len(data_loader)); the schedule's length must be a
    whole number of epochs."""
    grad_clip: float = 5.0
    """Global grad-norm clip (0 disables), on the gradient of the step's mean loss unless `accum_sum_semantics`."""
    accum_sum_semantics: bool = False
    """UNITER's convention: it sums (does not average) gradients over the accumulation
    micro-steps, so its `grad_norm` and Adam eps apply to a gradient `grad_accum` times
    ours. True divides grad_clip and eps by grad_accum, which gives UNITER's updates
    exactly for any split of the global batch whose micro-batches hold equal numbers of
    loss terms (docs/models.md, "UNITER's summed-gradient clip")."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; None = micro_batch_size x world size (no accumulation)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr and eps must be > 0, weight_decay and grad_clip >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_step_counts("optim", warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if self.schedule == "albef_epochs":
            self._check_albef_schedule()

    def _check_albef_schedule(self) -> None:
        if not self.epoch_steps or self.epoch_steps <= 0:
            raise ValueError("optim.schedule=albef_epochs needs optim.epoch_steps: the optimizer steps in an epoch "
                             "(ALBEF's len(data_loader): training examples // global batch)")
        if self.warmup_steps % ALBEF_WARMUP_BLOCK:
            raise ValueError(f"optim.schedule=albef_epochs warms up in blocks of {ALBEF_WARMUP_BLOCK} steps: "
                             f"optim.warmup_steps={self.warmup_steps} must be a multiple (ALBEF's warmup_epochs x "
                             f"{ALBEF_WARMUP_BLOCK})")
        if self.warmup_lr is not None and self.warmup_lr <= 0:
            raise ValueError(f"optim.warmup_lr must be > 0, got {self.warmup_lr}")


ALBEF_WARMUP_BLOCK = 100
"""ALBEF's warm-up steps its scheduler once per 100 iterations (its `warmup_epochs` count these blocks)."""


@dataclass(frozen=True)
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to CPU (stage >= 1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3: parameters with fewer elements stay unpartitioned (stage3_param_persistence_threshold)."""
    timeout_minutes: int = 30
    """Collective timeout; finite so a dead rank ends the job instead of hanging it."""
    overlap_comm: Optional[bool] = None
    """ZeRO-1/2: reduce gradient buckets while the backward still runs; None = on CUDA only
    (on CPU gloo gains nothing from it)."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO-1/2: elements per gradient reduction bucket (DeepSpeed's default)."""
    allgather_bucket_size: int = 500_000_000
    """ZeRO-1/2: elements per all-gather of the updated parameters (DeepSpeed's default)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.reduce_bucket_size <= 0 or self.allgather_bucket_size <= 0:
            raise ValueError("parallel.reduce_bucket_size and parallel.allgather_bucket_size must be positive "
                             "(elements; DeepSpeed's default is 500000000)")


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    initial_scale_power: int = 16
    """fp16 only: dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0

    @property
    def torch_dtype(self) -> "torch.dtype":
        """The weights' dtype in the engine (and of a model scored outside it, as `vlpt evaluate`'s)."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


RESUME_MODES = ("auto", "never", "must")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Everything of a run lives here: checkpoints, metrics.jsonl, the MLflow store. Relative to the
    working directory. `load_config` fills it with `runs/<config file stem>` when no file or override
    sets it, so rerunning the same command resumes the same run. `{now}` in it (opt-in) is filled with
    rank 0's start time: a new folder each start, which a rerun therefore never resumes."""
    max_steps: int = 200000
    """Optimizer steps of the whole run."""
    stop_after_steps: Optional[int] = None
    """Stop (with a checkpoint) after this step though the schedule runs to max_steps; for time-boxed jobs."""
    seed: int = 42
    log_every: int = 10
    val_every: int = 0
    """Validate every N steps (0 = only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from run_dir's newest checkpoint when there is one, else start; never: refuse
    to start in a run dir that holds a checkpoint; must: refuse to start when there is none.
    Earlier versions' true / false are read as auto / never (OLD_VALUES)."""
    checkpoint_s3: Optional[str] = None
    """s3://bucket/prefix: upload every checkpoint there (keep_last applies too); a run whose
    run_dir has no checkpoint resumes from the newest upload. Reached as storage.s3 says;
    credentials from the AWS chain (environment, instance role), never from the config."""
    progress: bool = True
    """Progress bar on rank 0."""
    max_consecutive_nonfinite: int = 10
    """An optimizer step whose loss is NaN/inf on any rank is skipped (weights and optimizer
    state untouched) and counted; this many in a row end the run with one error line."""
    compile: bool = False
    """torch.compile each transformer block (the recipe's `blocks_to_compile`) with dynamic shapes
    (trainer/compile.py, docs/operations.md "Compiled layers"); off until measured on a GPU."""

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.log_every <= 0 or self.keep_last <= 0:
            raise ValueError("max_steps, log_every and keep_last must be positive")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("train.max_consecutive_nonfinite must be at least 1")
        _check_step_counts("train", max_steps=self.max_steps, stop_after_steps=self.stop_after_steps,
                           log_every=self.log_every, val_every=self.val_every, save_every=self.save_every)
        if self.checkpoint_s3 is not None and not (self.checkpoint_s3.startswith("s3://")
                                                   and len(self.checkpoint_s3) > len("s3://")):
            raise ValueError(f"train.checkpoint_s3 must be an s3://bucket/prefix URL, got {self.checkpoint_s3!r}")
        if self.stop_after_steps is not None and self.stop_after_steps <= 0:
            raise ValueError("stop_after_steps must be positive")
        if isinstance(self.resume, bool):  # a Python caller's earlier value (YAML goes through OLD_VALUES)
            object.__setattr__(self, "resume", OLD_VALUES["train.resume"][self.resume])
        if self.resume not in RESUME_MODES:
            raise ValueError(f"train.resume must be one of {', '.join(RESUME_MODES)}, got {self.resume!r}")
        if self.resume == "must" and "{now}" in self.run_dir:
            raise ValueError("train.resume=must with {now} in train.run_dir can never resume (a new folder "
                             "each start); name the run dir of the run to resume, e.g. --train.run_dir=runs/x")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None
    """MLflow tracking URI; None = a local store in <run_dir>/mlruns."""
    experiment: str = "vlpt"
    run_name: Optional[str] = None
    request_timeout_s: float = 10.0
    """Per HTTP request to a tracking server (MLflow's own default is 120 s, retried 7 times)."""
    retry_interval_s: float = 30.0
    """After a failed call, records are buffered and sent again no sooner than this; doubles per failure."""
    retry_max_interval_s: float = 300.0
    max_buffered: int = 100_000
    """Metric values kept while the server is unreachable; older ones are dropped (metrics.jsonl keeps all)."""

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.retry_interval_s < 0 or self.max_buffered < 1:
            raise ValueError("tracking: request_timeout_s > 0, retry_interval_s >= 0 and max_buffered >= 1")
        if self.retry_max_interval_s < self.retry_interval_s:
            raise ValueError("tracking.retry_max_interval_s must be >= tracking.retry_interval_s")


@dataclass(frozen=True)
class StorageConfig:
    """How object storage is reached, for the data and the checkpoints alike."""

    s3: S3Options = field(default_factory=S3Options)
    """Endpoint, region, retries and timeouts for s3:// URLs; credentials come only from the
    standard AWS chain (environment, ~/.aws, instance role), never from this file."""


class ModelSection:
    """The type of the `model:` section: the config class of the recipe its `arch` names
    (trainer/recipes/), resolved by the config loader when it reads the section."""

    @staticmethod
    def section_for(value: Mapping, path: str) -> type:
        arch = value.get("arch", DEFAULT_ARCH) if isinstance(value, Mapping) else DEFAULT_ARCH
        try:
            return recipe_class(str(arch)).model_config
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class Config:
    stage: Literal["pretrain", "finetune"] = "pretrain"
    """`pretrain` (`vlpt pretrain`) or `finetune` (`vlpt finetune` / `vlpt evaluate`): picks the
    model family's recipe of that stage (trainer/recipes/)."""
    model: ModelSection = field(default_factory=ModelConfig)
    """The model family's section: `arch: uniter` (default, ModelConfig), `arch: albef`
    (AlbefConfig), or a registered family of your own."""
    data: DataConfig = field(default_factory=DataConfig)
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0})
    """Task mix: one task per optimizer step, drawn with probability proportional to its ratio."""
    wra: WraConfig = field(default_factory=WraConfig)
    """Word-region alignment (optimal transport) added to UNITER's ITM."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """What `stage: finetune` reads and trains (docs/downstream.md)."""

    def __post_init__(self) -> None:
        recipe = recipe_class(self.model.arch, self.stage)
        _check_task_ratios("tasks", self.tasks, recipe.tasks, allow_empty=bool(self.data.datasets))
        for d in self.data.datasets:
            _check_task_ratios(f"data.datasets.{d.name}.tasks", d.tasks or self.tasks, recipe.tasks,
                               allow_empty=False)
        recipe.for_config(self).check_config(self)
        total, epoch = self.optim.total_steps or self.train.max_steps, self.optim.epoch_steps
        if self.optim.schedule == "albef_epochs" and total % epoch:
            raise ValueError(f"optim.schedule=albef_epochs: the schedule's {total} steps (optim.total_steps or "
                             f"train.max_steps) are not a whole number of optim.epoch_steps={epoch}")
        if self.train.compile and self.parallel.zero_stage == 3:
            raise ValueError("train.compile needs parallel.zero_stage <= 2: ZeRO-3 gathers each submodule's "
                             "parameters in module hooks torch.compile cannot trace, which cuts every compiled "
                             "layer into a graph per submodule; set parallel.zero_stage=2 or train.compile=false")


def _check_task_ratios(where: str, ratios: dict[str, float], known: tuple[str, ...], allow_empty: bool) -> None:
    if not ratios and allow_empty:
        return
    if not ratios:
        raise ValueError(f"{where}: give at least one task with a positive ratio")
    for name, ratio in ratios.items():
        if name not in known:
            raise ValueError(f"unknown task {name!r} in {where}; model.arch's tasks are {', '.join(known)}")
        if ratio < 0:
            raise ValueError(f"{where}.{name}: ratio must be >= 0, got {ratio}")
    if sum(ratios.values()) <= 0:
        raise ValueError(f"{where}: the ratios must not all be 0")


MOVED_KEYS = {
    "data.s3": "storage.s3",
    "data.pixels": "data.albef.pixels",
    "data.mrm_prob": "data.uniter.mrm_prob",
    "data.itm_neg_prob": "data.uniter.itm_neg_prob",
    "data.itm_hard_candidates": "data.uniter.itm_hard_candidates",
    "data.token_budget": "data.uniter.token_budget",
    "data.vocab": "data.tokenizer.path",
}
"""Keys of earlier versions -> where they live now."""


OLD_VALUES = {
    "train.resume": {True: "auto", False: "never"},
}
"""Values of earlier versions -> the value that means the same now (read silently: same behaviour)."""


def map_old_values(raw: dict) -> None:
    """Replace, in place, each earlier version's value of a key by the value that means the same now."""
    for dotted, mapping in OLD_VALUES.items():
        section, key = dotted.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), bool) and node[key] in mapping:
            node[key] = mapping[node[key]]


def set_default_run_dir(raw: dict, config_path: str) -> None:
    """train.run_dir, when no file or override sets it: runs/<config file stem>, so the same
    command names the same run (and resumes it)."""
    if raw.get("train") is None:  # absent, or an empty `train:`
        raw["train"] = {}
    train = raw["train"]
    if isinstance(train, dict) and train.get("run_dir") is None:
        stem = os.path.splitext(os.path.basename(config_path))[0]
        train["run_dir"] = os.path.join("runs", stem)


def check_moved_keys(raw: Mapping) -> None:
    """A key that moved is refused with one line naming its new place."""
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), Mapping) and key in raw[section]:
            raise ConfigError(f"config key {old!r} has moved: use {new!r} (e.g. --{new}... on the command line)")


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """YAML file (+ includes) + dotted overrides → frozen `Config`."""
    raw = apply_overrides(load_yaml_with_includes(path), list(overrides))
    map_old_values(raw)
    check_moved_keys(raw)
    set_default_run_dir(raw, path)
    check_known_keys(Config, raw)  # costs the same for any input: a typo is named first
    check_config_values(raw)  # before from_dict, whose type errors would echo a secret URL
    cfg = from_dict(Config, raw)
    # What no file set (an override, a default) is relative to the working directory; made absolute,
    # every path reads the same from a saved copy of this config (<run_dir>/config.yaml, a launch's frozen one).
    return from_dict(Config, resolve_paths(to_dict(cfg), os.getcwd()))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(config_to_yaml(cfg))


__all__ = [
    "AlbefConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PrecisionConfig", "StorageConfig", "TrackingConfig", "TrainConfig", "load_config", "save_config",
    "config_to_yaml",
]
