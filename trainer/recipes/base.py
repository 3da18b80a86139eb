"""The protocol every model family implements (docs/design.md, "Recipes").

A recipe says what is particular to one family: its config section, its model, how a task's
samples become a batch, what runs inside the engine's forward and over which term counts its
losses are normalised, what happens around an optimizer step, what it saves beside the
engine, and how it validates. Everything else (the loop, the optimizer step, checkpoints,
data loading, tracking) is the run's and is the same for every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.bench_flops import BatchWork
    from trainer.config import Config
    from trainer.distributed import DistInfo
    from trainer.engine import BatchLayout


@dataclass(frozen=True)
class StepContext:
    """What one optimizer step may depend on besides its batches."""

    step: int
    """Optimizer steps done before this one (0 for the first)."""
    seed: int
    device: torch.device
    after_skip: bool = False
    """The previous step was skipped (non-finite loss): the weights did not move."""


def _nothing_after(means: dict[str, float], skipped: bool) -> None:
    return None


@dataclass
class StepPlan:
    """A recipe's part of one optimizer step, made after the step's batches are read."""

    forward_args: Callable[[int, dict], tuple]
    """(micro-batch index, batch) -> the arguments of `engine(batch, *args)` after the batch:
    a task function `(model, batch, *rest) -> TaskResult` and its extra arguments."""
    finish: Callable[[dict[str, float], bool], None] = field(default=_nothing_after)
    """Called with the step's global means (may add derived ones) and whether the step is
    skipped, before the update is applied."""


class Recipe:
    """One model family. The registry (trainer/recipes/__init__.py) maps `model.arch` to it;
    the run makes one instance per run from the resolved config."""

    arch: ClassVar[str]
    """The `model.arch` value that selects this family."""
    stage: ClassVar[str] = "pretrain"
    """`pretrain` or `finetune`: the config's `stage` that selects this recipe of the family."""
    model_config: ClassVar[type]
    """Dataclass of the `model:` section (must have an `arch` field defaulting to `arch`)."""
    tasks: ClassVar[tuple[str, ...]]
    """Task names a mix (`tasks:`) may use."""
    shard_format: ClassVar[str]
    """The `format` its manifests must declare (data/shards.py)."""

    def __init__(self, cfg: "Config") -> None:
        self.cfg = cfg

    @classmethod
    def for_config(cls, cfg: "Config") -> type["Recipe"]:
        """The recipe class that runs `cfg`: this one, or (a family with a recipe per task) the task's."""
        return cls

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Rules across sections (ValueError with the keys to change); the task names are checked already."""

    @classmethod
    def check_layout(cls, cfg: "Config", layout: "BatchLayout") -> None:
        """Rules on the split of the global batch (ValueError with the keys to change): `attach` applies
        them at start, and `vlpt launch` at the job's world size before it renders anything."""

    def check_manifest(self, manifest, where: str) -> None:
        """A dataset the run will read against the model (ValueError naming the key to change)."""

    # The run's data: pretraining recipes read `data:`'s shard folders (trainer/run_setup.py); a
    # recipe that reads other data (fine-tuning's task folders) overrides these five.
    @classmethod
    def input_dirs(cls, cfg: "Config") -> list:
        """The folders the run reads (`DatasetDir`s: config key, path), checked to exist before any heavy work."""
        from trainer.run_setup import dataset_dirs

        return dataset_dirs(cfg.data)

    def check_data(self, tok) -> None:
        """Before the run folder is made: every dataset the run reads, against the model."""
        from trainer.run_setup import validate_against_data

        validate_against_data(self.cfg, self, tok)

    def report_data(self, tok) -> None:
        """Rank 0, at start: a line on what the tokenizer makes of the training text."""
        from trainer.run_setup import log_caption_report

        log_caption_report(self.cfg, self, tok)

    def train_loaders(self, tok, layout: "BatchLayout", rank: int, positions: dict) -> dict:
        """One loader per mix key, at the resumed positions (`next()`, `state_dict()`, counters)."""
        from trainer.run_setup import build_train_loaders

        return build_train_loaders(self.cfg, self, tok, layout, rank, positions)

    def val_splits(self, tok, skipped: dict[str, int]) -> dict[str, tuple[str, Any]]:
        """Every held-out split, read whole on this rank: key -> (task, `read_val_split`'s reading)."""
        from trainer.run_setup import read_val_splits

        return read_val_splits(self.cfg, self, tok, skipped)

    def lr_multipliers(self) -> dict[str, float]:
        """{parameter-name prefix: lr multiplier} for parameter groups of their own (a head's lr_mul)."""
        return {}

    def stream_options(self) -> dict[str, Any]:
        """Keyword arguments of the training and validation streams (data.loader.StreamSpec)."""
        return {"modality": "regions", "img_dim": 0}

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def checkpoint_model(self) -> Optional[nn.Module]:
        """The model the run's checkpoints hold, built with no weights read (`vlpt convert export` checks a
        checkpoint's keys and shapes against it), or None where its layout depends on data (a task folder)."""
        return None

    def collate(self, task: str, tok) -> Callable:
        """(samples, rng) -> batch for `task`; picklable (DataLoader workers build batches)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, layout: "BatchLayout", device: torch.device) -> None:
        """After the model is built and before the engine wraps it (ALBEF copies its teacher here)."""

    def blocks_to_compile(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """`train.compile`: the repeated blocks (transformer layers) that trainer/compile.py compiles one
        by one, grouped by what they are for its log line ({"encoder layers": [...]}). Called after
        `attach`, so it may name blocks of what the recipe holds beside the model (a teacher that runs
        every step). None (the default) refuses `train.compile` for the family."""
        return {}

    def on_loaders(self, loaders: dict, layout: "BatchLayout") -> None:
        """Once the training loaders exist (e.g. to size a schedule by the epoch)."""

    def replicated(self) -> dict[str, nn.Module]:
        """Modules outside the engine, whole and alike on every rank, saved and restored with it."""
        return {}

    def term_counts(self, batch: dict, task: str) -> dict[str, float]:
        """Loss name -> number of loss terms in `batch`, for every loss its task returns."""
        raise NotImplementedError

    def begin_step(self, engine, batches: list[dict], task: str, ctx: StepContext) -> StepPlan:
        raise NotImplementedError

    def step_flops(self, batch: dict, task: str) -> "BatchWork":
        """Samples, real tokens and model FLOPs of training on `batch` (trainer/bench_flops.py): the
        useful ones over real tokens only and those of the padded layout, for `vlpt bench train`'s MFU."""
        raise NotImplementedError

    def read_val_split(self, shards: list[str], tok, skipped: dict[str, int]) -> Any:
        """A held-out split read whole on this rank; bad samples and shards counted into `skipped`."""
        raise NotImplementedError

    def validate(self, engine, tok, splits: dict[str, tuple[str, Any]], info: "DistInfo",
                 skipped: dict[str, int]) -> dict[str, float]:
        """Collective. Metrics named `val/<mix key>_<name>` over every split {key: (task, data)};
        bad samples met here are added to `skipped` (already summed over ranks)."""
        raise NotImplementedError

    # `vlpt evaluate` (trainer/evaluate.py): fine-tuning recipes implement these two.
    @classmethod
    def evaluation_config(cls, cfg: "Config", split: Optional[str]) -> "Config":
        """The config that scores `split` (None: the config's held-out split) without training or init_from."""
        raise ValueError(f"vlpt evaluate is not available for model.arch={cls.arch} (stage: {cls.stage})")

    def evaluate(self, checkpoint: str, tok, info: "DistInfo") -> "Evaluation":
        """Collective. The weights at `checkpoint` scored on the held-out split."""
        raise NotImplementedError


@dataclass
class Evaluation:
    """What `vlpt evaluate` reports and writes for one task."""

    task: str
    split: str
    examples: int
    metrics: dict[str, float]
    predictions: dict
    """The payload of trainer/predictions.py's `write_predictions(task, ...)`."""
    skipped: dict[str, int]
