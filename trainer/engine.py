"""DeepSpeed engine from the optim / parallel / precision sections."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
from trainer.config_files import ConfigError
from trainer.gradients import GradientPolicy, trainer_clips

log = logging.getLogger(__name__)

# UNITER's rule (optim/misc.py), case-sensitive: no decay for biases and `LayerNorm.*`.
# The image embedder's `img_layer_norm.weight` / `pos_layer_norm.weight` and the heads'
# LayerNorms inside nn.Sequential (`net.3.weight`) are therefore decayed, as in UNITER.
NO_DECAY = ("bias", "LayerNorm.weight")


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch of one optimizer step is split."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def n_streams(self) -> int:
        """Micro-batches per optimizer step over all ranks (one data stream each)."""
        return self.grad_accum * self.world_size


def batch_layout(optim: OptimConfig, micro_batch_size: int, world_size: int) -> BatchLayout:
    global_bs = optim.global_batch_size or micro_batch_size * world_size
    per_step = micro_batch_size * world_size
    if global_bs % per_step:
        raise ConfigError(
            f"optim.global_batch_size={global_bs} must be a multiple of data.micro_batch_size "
            f"x world size = {micro_batch_size} x {world_size} = {per_step}")
    return BatchLayout(micro_batch_size, global_bs // per_step, world_size)


def build_deepspeed_config(optim: OptimConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                           layout: BatchLayout, device_type: str = "cpu") -> dict[str, Any]:
    ours = trainer_clips(parallel, precision)
    zero = zero_section(parallel, device_type, ours)
    cfg: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # trainer/gradients.py clips where DeepSpeed's checks would read the norm on the host
        "gradient_clipping": 0.0 if ours else clip_norm(optim, layout),
        "zero_optimization": zero,
        # Our AdamW is built here, not by DeepSpeed's name lookup, so ZeRO must accept it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision.dtype == "bf16":
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": not ours}
    elif precision.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0,
                       "initial_scale_power": precision.initial_scale_power,
                       "loss_scale_window": precision.loss_scale_window,
                       "min_loss_scale": precision.min_loss_scale}
    return cfg


def zero_section(parallel: ParallelConfig, device_type: str, trainer_clips: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage in (1, 2):
        overlap = parallel.overlap_comm if parallel.overlap_comm is not None else device_type == "cuda"
        zero.update(overlap_comm=overlap, contiguous_gradients=True,
                    reduce_bucket_size=parallel.reduce_bucket_size,
                    allgather_bucket_size=parallel.allgather_bucket_size)
    if trainer_clips:
        zero["compute_grad_norm"] = False
    if parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = parallel.zero3_persistence_threshold
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def clip_norm(optim: OptimConfig, layout: BatchLayout) -> float:
    """The max norm of the gradient DeepSpeed sees (the step's mean loss's); 0 = no clip."""
    return optim.grad_clip / accum_sum_factor(optim, layout)


def accum_sum_factor(optim: OptimConfig, layout: BatchLayout) -> int:
    """How much larger the configured clip / eps's gradient is than the one DeepSpeed sees.

    DeepSpeed's gradient is that of the step's mean loss; UNITER's is the sum of its
    micro-steps' mean-loss gradients, `grad_accum` times ours (ranks are averaged in
    both). Adam is invariant to the gradient's scale except through eps and the clip.
    """
    return layout.grad_accum if optim.accum_sum_semantics else 1


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 lr_mul: Optional[dict[str, float]] = None) -> list[dict]:
    """Decayed and undecayed parameters; with `lr_mul` {name prefix: multiplier} (a fine-tuning
    head, docs/downstream.md) the matching parameters get groups of their own at lr x multiplier."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mul = next((m for prefix, m in (lr_mul or {}).items() if name.startswith(prefix)), 1.0)
        decayed = not any(part in name for part in NO_DECAY)
        groups.setdefault((mul, decayed), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))  # without lr_mul: decay, no_decay
    return [{"params": groups[k], "weight_decay": weight_decay if k[1] else 0.0, "lr": lr * k[0]} for k in order]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device,
                    offload: bool, eps_divisor: int = 1,
                    lr_mul: Optional[dict[str, float]] = None) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay, optim.lr, lr_mul)
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps / eps_divisor)
    impl = optim.impl
    if impl == "auto":
        impl = "deepspeed" if offload else ("torch_fused" if device.type == "cuda" else "torch")
        if device.type == "cuda" and not offload and _apex_available():
            impl = "apex"
    if impl == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    if impl == "deepspeed":
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        from deepspeed.ops.adam import FusedAdam as DSFusedAdam

        return DSFusedAdam(groups, adam_w_mode=True, **kw)
    if impl == "torch_fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    # torch only defaults to the multi-tensor path on accelerators; on CPU it is also
    # several times faster than one kernel per parameter for small models.
    return torch.optim.AdamW(groups, foreach=True, **kw)


def _apex_available() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return True


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at a step: linear warmup, then the configured decay."""
    if optim.schedule == "albef_epochs":
        return albef_epoch_lambda(optim, total_steps)
    warmup = optim.warmup_steps
    floor = optim.min_lr / optim.lr

    def fn(index: int) -> float:
        # LambdaLR asks for index k before the (k+1)-th update; UNITER counts that update as step k+1.
        step = index + 1
        if warmup and step < warmup:
            return step / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def albef_epoch_lambda(optim: OptimConfig, total_steps: int):
    """ALBEF's timm cosine scheduler as its scripts step it: epoch 0 starts at `warmup_lr` and, after update i
    = 0, 100, ..., warmup_steps, moves to `warmup_lr + (lr - warmup_lr) * (i / 100) / W` (W = warmup_steps /
    100), reaching `lr`; epoch e >= 1 runs at `min_lr + (lr - min_lr) * (1 + cos(pi * e / E)) / 2` throughout
    (E = total_steps / epoch_steps)."""
    from trainer.config import ALBEF_WARMUP_BLOCK

    steps, blocks = optim.epoch_steps, optim.warmup_steps // ALBEF_WARMUP_BLOCK
    epochs, rest = divmod(total_steps, steps)
    if rest:
        raise ValueError(f"optim.schedule=albef_epochs: the schedule's {total_steps} steps are not a whole number "
                         f"of optim.epoch_steps={steps}; set train.max_steps (or optim.total_steps) to epochs x "
                         f"{steps}")
    start = optim.lr if optim.warmup_lr is None else optim.warmup_lr

    def lr_at(index: int) -> float:
        # LambdaLR asks for index k before update k (from 0); ALBEF's update k reads the lr its scheduler set
        # after update 100 * floor((k - 1) / 100), or its initial warmup_lr before the first.
        epoch = index // steps
        if epoch >= 1:
            return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        block = 0 if index == 0 else (index - 1) // ALBEF_WARMUP_BLOCK
        return optim.lr if block >= blocks else start + (optim.lr - start) * block / blocks

    return lambda index: lr_at(index) / optim.lr


class OptimizerStepGate:
    """Lets the trainer veto an optimizer step DeepSpeed is about to take.

    DeepSpeed skips overflowing steps itself only for fp16/bf16 at ZeRO >= 1; in fp32 or
    at ZeRO-0 a NaN gradient reaches the optimizer. Every DeepSpeed path (ZeRO 0-3, the
    bf16 wrapper, offload) ends in our optimizer's `step()`, so a closed gate there keeps
    the weights and the Adam moments as they were at every stage.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        inner = optimizer.step
        self.is_open = True

        def gated_step(*args, **kwargs):
            if self.is_open:
                return inner(*args, **kwargs)
            # A skipped first step is still a step to the LR scheduler (its order check).
            optimizer._opt_called = True
            return None

        # `inner` is the LR scheduler's wrapper, which still records the call: tell the
        # scheduler its wrapper is in place, or it warns that `step` was overridden.
        gated_step._wrapped_by_lr_sched = getattr(inner, "_wrapped_by_lr_sched", False)
        optimizer.step = gated_step

    @contextlib.contextmanager
    def closed_if(self, close: bool):
        self.is_open = not close
        try:
            yield
        finally:
            self.is_open = True


def step_gate(engine) -> OptimizerStepGate:
    gate = getattr(engine, "step_gate", None)
    assert isinstance(gate, OptimizerStepGate), "engine was not made by build_engine"
    return gate


def build_engine(model: nn.Module, optim: OptimConfig, parallel: ParallelConfig,
                 precision: PrecisionConfig, layout: BatchLayout, total_steps: int,
                 device: torch.device, lr_mul: Optional[dict[str, float]] = None):
    """deepspeed.initialize with our optimizer and LR schedule; `lr_mul` as `param_groups`."""
    import deepspeed

    ds_config = build_deepspeed_config(optim, parallel, precision, layout, device.type)
    model.to(device)
    optimizer = build_optimizer(model, optim, device, parallel.offload_optimizer,
                                eps_divisor=accum_sum_factor(optim, layout), lr_mul=lr_mul)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
    gate = OptimizerStepGate(optimizer)  # after the scheduler, which needs `step` bound to the optimizer
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    engine.step_gate = gate
    engine.gradient_policy = GradientPolicy(
        parallel.zero_stage, clip_norm(optim, layout) if trainer_clips(parallel, precision) else 0.0,
        layout.world_size if parallel.zero_stage == 0 else 1, measured=precision.dtype != "fp16")
    log.info("DeepSpeed engine: ZeRO-%d, %s, global batch %d = %d micro x %d accum x %d ranks",
             parallel.zero_stage, precision.dtype, layout.global_batch_size,
             layout.micro_batch_size, layout.grad_accum, layout.world_size)
    return engine, ds_config
