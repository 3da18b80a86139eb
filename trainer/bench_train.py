"""`vlpt bench train`: training throughput of a config, ours against the plain way, in one run.

Both sides train the same model (same initial weights) on the same pre-collated batches
(read once from the config's data, then cycled, so the input pipeline is not measured) in
the same task order, at the config's precision:

  ours      our UNITER encoder on the DeepSpeed engine of the config (ZeRO stage, fused
            optimizer), masked gathers from collate's flat positions, the fused IPOT kernel
            on CUDA, one host sync per step (the stats);
  baseline  the plain way: Hugging Face `BertEncoder` as the backbone, boolean-mask gathers
            (`hidden[mask]`, a host sync each), UNITER's eager per-op IPOT loop, torch DDP
            without ZeRO, torch AdamW, autocast for bf16/fp16 and `loss.item()` per micro-batch.

MFU (CUDA, bf16/fp16 only) counts the matmul FLOPs of the encoder at the padded length:
forward+backward = 3 x forward; per sample forward = 2 P L + 4 n_layers L^2 H, P the
encoder's linear weights, L the padded sequence, H the hidden size.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import torch
from torch import Tensor, nn

from trainer.config import Config
from trainer.config_files import ConfigError
from trainer.engine import BatchLayout, batch_layout, build_engine, param_groups
from trainer.models.bert import extended_attention_mask
from trainer.models.config import ModelConfig
from trainer.recipes.base import StepContext
from trainer.recipes.uniter import UniterRecipe
from trainer.step import optimizer_step
from trainer.task_mix import draw_task, mix_ratios, task_of

# Dense bf16/fp16 tensor-core peak per GPU (vendor data sheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class TrainBenchConfig:
    steps: int = 20
    """Timed optimizer steps per side."""
    warmup: int = 5
    """Untimed steps first (allocator, autotuning, DeepSpeed's first-step work)."""
    batches_per_task: int = 4
    """Optimizer steps' worth of batches read per mix key, then cycled."""
    profile_steps: int = 0
    """After timing, this many more steps per side under torch.profiler (not timed): the
    record gets each side's top operators by self time, to say where a gap comes from."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.batches_per_task < 1 or self.profile_steps < 0:
            raise ValueError("bench train: --steps >= 1, --warmup >= 0, --batches-per-task >= 1 and "
                             "--profile-steps >= 0")


class CyclingLoader:
    """Stands in for the task loader: the prefetched micro-batches, round and round."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.i = batches, 0

    def next(self) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


# ---------------------------------------------------------------- the plain-way model


class HuggingFaceEncoder(nn.Module):
    """`transformers`' BertEncoder in the place of ours (same parameter names)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEncoder

        hf = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size, hidden_act="gelu",
                        hidden_dropout_prob=cfg.hidden_dropout_prob,
                        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
                        layer_norm_eps=1e-12)
        self.layer = BertEncoder(hf).layer

    def forward(self, hidden: Tensor, attn_masks: Tensor) -> Tensor:
        mask = extended_attention_mask(attn_masks, hidden.dtype)  # [B, 1, 1, L]
        for layer in self.layer:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def baseline_model(model: nn.Module) -> nn.Module:
    """`model` with its encoder swapped for Hugging Face's, carrying the same weights."""
    encoder = HuggingFaceEncoder(model.config)
    encoder.load_state_dict(model.uniter.encoder.state_dict(), strict=True)
    model.uniter.encoder = encoder
    return model


def boolean_mask_gather(hidden: Tensor, index: Tensor) -> Tensor:
    """UNITER's gather: a boolean mask over every position, `hidden[mask]` (synchronises)."""
    b, length, h = hidden.shape
    mask = torch.zeros(b * length, dtype=torch.bool, device=hidden.device)
    mask[index] = True  # collate's positions are ascending, so the rows come out in its order
    return hidden.reshape(b * length, h)[mask]  # [N, H]


@contextlib.contextmanager
def plain_ops():
    """Boolean-mask gathers in the heads and the eager IPOT loop (kernels off)."""
    import trainer.recipes.uniter_tasks as tasks

    with mock.patch.dict(os.environ, {"VLPT_KERNELS": "off"}), \
            mock.patch.object(tasks, "masked_gather", boolean_mask_gather):
        yield


# ---------------------------------------------------------------- timing


@dataclass
class Timed:
    seconds: float = 0.0
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    """Valid text tokens + regions (attention-mask ones)."""
    flops: float = 0.0

    def figures(self, peak: Optional[float], world: int) -> dict:
        s = max(self.seconds, 1e-9)
        out = {"steps_per_s": self.steps / s, "samples_per_s": self.samples / s, "tokens_per_s": self.tokens / s,
               "seconds": self.seconds, "steps": self.steps}
        if peak:
            out["mfu"] = self.flops / s / (peak * world)
        return out


def step_work(batches: list[dict], m: ModelConfig, world: int) -> tuple[int, int, float]:
    """(samples, tokens, model FLOPs) of one optimizer step over all ranks, from this rank's batches."""
    params = m.num_hidden_layers * (4 * m.hidden_size ** 2 + 2 * m.hidden_size * m.intermediate_size)
    samples = tokens = 0
    flops = 0.0
    for b in batches:
        bsz, length = b["attn_masks"].shape
        samples += bsz
        tokens += int(b["attn_masks"].sum())
        flops += 3 * bsz * (2 * params * length + 4 * m.num_hidden_layers * length ** 2 * m.hidden_size)
    return samples * world, tokens * world, flops * world


def timed_loop(tasks: list[str], warmup: int, device: torch.device, run_step) -> float:
    """Seconds of `run_step(key)` over tasks[warmup:], after the untimed warmup steps."""
    for key in tasks[:warmup]:
        run_step(key)
    sync(device)
    t0 = time.perf_counter()
    for key in tasks[warmup:]:
        run_step(key)
    sync(device)
    return time.perf_counter() - t0


PROFILE_ROWS = 25
PROFILE_PRINTED = 14
"""Table lines printed per side (header + top ops); the JSON keeps all PROFILE_ROWS."""


def profiled_steps(tasks: list[str], device: torch.device, run_step) -> dict[str, list[str]]:
    """torch.profiler's tables of the operators that took the most self time over `tasks`:
    host time (launch overhead, Python) and, on CUDA, device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for key in tasks:
            run_step(key)
        sync(device)
    sorts = {"by_self_cpu": "self_cpu_time_total"}
    if device.type == "cuda":
        sorts["by_self_cuda"] = "self_cuda_time_total"
    ops = prof.key_averages()
    return {name: ops.table(sort_by=key, row_limit=PROFILE_ROWS).splitlines() for name, key in sorts.items()}


def measure(tasks: list[str], bench: TrainBenchConfig, device: torch.device,
            run_step) -> tuple[float, dict[str, list[str]]]:
    """(timed seconds, profile tables or {})."""
    seconds = timed_loop(tasks, bench.warmup, device, run_step)
    table = profiled_steps(tasks[bench.warmup:][:bench.profile_steps], device, run_step) if bench.profile_steps else {}
    return seconds, table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def run_ours(recipe: UniterRecipe, model: nn.Module, layout: BatchLayout, batches: dict, tasks: list[str],
             bench: TrainBenchConfig, device: torch.device) -> tuple[float, dict]:
    cfg = recipe.cfg
    total = cfg.optim.total_steps or cfg.train.max_steps
    engine, _ = build_engine(model, cfg.optim, cfg.parallel, cfg.precision, layout, total, device)
    loaders = {key: CyclingLoader(b) for key, b in batches.items()}
    steps = itertools.count()
    measured = measure(tasks, bench, device, lambda key: optimizer_step(
        engine, recipe, loaders[key], task_of(key), layout, StepContext(next(steps), cfg.train.seed, device)))
    engine.destroy()
    return measured


def run_baseline(recipe: UniterRecipe, model: nn.Module, layout: BatchLayout, batches: dict, tasks: list[str],
                 bench: TrainBenchConfig, device: torch.device) -> tuple[float, dict]:
    from torch.nn.parallel import DistributedDataParallel

    cfg = recipe.cfg
    model = baseline_model(model).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    loaders = {key: CyclingLoader(b) for key, b in batches.items()}

    def step(key: str) -> None:
        for i in range(layout.grad_accum):
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in loaders[key].next().items()}
            no_sync = ddp.no_sync() if i + 1 < layout.grad_accum else contextlib.nullcontext()
            with no_sync, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                result = ddp(batch, recipe.task_fns[task_of(key)])
                loss = result.losses["loss"] / max(batch["n_items"], 1) / layout.grad_accum
            scaler.scale(loss).backward()
            loss.item()  # the plain way logs every micro-batch's loss
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    with plain_ops():
        return measure(tasks, bench, device, step)


def prefetch(recipe: UniterRecipe, tok, layout: BatchLayout, rank: int, n_steps: int) -> dict:
    """`n_steps` optimizer steps' worth of this rank's micro-batches per mix key."""
    from trainer.run_setup import build_train_loaders

    loaders = build_train_loaders(recipe.cfg, recipe, tok, layout, rank, {})
    return {key: [loader.next() for _ in range(n_steps * layout.grad_accum)] for key, loader in loaders.items()}


def timed_work(model: ModelConfig, batches: dict, tasks: list[str], warmup: int, accum: int,
               world: int) -> Timed:
    """Samples, tokens and FLOPs of the timed steps: the batches both sides read in those steps."""
    work, cursor = Timed(), {key: 0 for key in batches}
    for i, key in enumerate(tasks):
        step_batches = [batches[key][(cursor[key] + j) % len(batches[key])] for j in range(accum)]
        cursor[key] += accum
        if i >= warmup:
            samples, tokens, flops = step_work(step_batches, model, world)
            work.steps += 1
            work.samples += samples
            work.tokens += tokens
            work.flops += flops
    return work


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def run_train_bench(cfg: Config, bench: TrainBenchConfig) -> dict:
    """Collective under torchrun; every rank returns the same figures."""
    from trainer.distributed import setup_distributed
    from data.tokenizer import load_tokenizer
    from trainer.run_setup import validate_against_data

    if cfg.model.arch != "uniter":
        raise ConfigError(f"vlpt bench train measures UNITER's step; model.arch={cfg.model.arch} is not "
                          "benchmarked yet (time a `vlpt pretrain` run: its summary reports samples/s)")
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    tok = load_tokenizer(cfg.data.vocab)
    recipe = UniterRecipe(cfg)
    validate_against_data(cfg, recipe, tok)
    layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, info.world_size)
    batches = prefetch(recipe, tok, layout, info.rank, bench.batches_per_task)
    ratios = mix_ratios(cfg)
    tasks = [draw_task(cfg.train.seed, s, ratios) for s in range(bench.warmup + bench.steps)]
    work = timed_work(cfg.model, batches, tasks, bench.warmup, layout.grad_accum, info.world_size)
    results = {}
    for side, runner in (("ours", run_ours), ("baseline", run_baseline)):
        torch.manual_seed(cfg.train.seed)
        model = recipe.build_model()
        recipe.attach(model, layout, info.device)
        seconds, tables = runner(recipe, model, layout, batches, tasks, bench, info.device)
        timed = Timed(seconds, work.steps, work.samples, work.tokens, work.flops)
        results[side] = timed.figures(peak_flops(info.device, cfg.precision.dtype), info.world_size)
        if tables:
            results[side]["profile"] = {"steps": bench.profile_steps, **tables}
    ratio = {k: results["ours"][k] / results["baseline"][k] for k in ("steps_per_s", "samples_per_s", "tokens_per_s")}
    return {"world_size": info.world_size, "global_batch_size": layout.global_batch_size,
            "precision": cfg.precision.dtype, "zero_stage": cfg.parallel.zero_stage,
            "tasks": dict(sorted(ratios.items())), "timed_steps": bench.steps, "warmup_steps": bench.warmup,
            "ours": results["ours"], "baseline": results["baseline"], "ours_over_baseline": ratio}


def format_train_result(result: dict) -> str:
    lines = [f"bench train: world {result['world_size']}, global batch {result['global_batch_size']}, "
             f"{result['precision']}, ZeRO-{result['zero_stage']}, {result['timed_steps']} timed steps"]
    for side in ("ours", "baseline"):
        r = result[side]
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append(f"  {side:<9} {r['steps_per_s']:8.2f} steps/s {r['samples_per_s']:10.1f} samples/s "
                     f"{r['tokens_per_s']:12.0f} tokens/s{mfu}")
    for side in ("ours", "baseline"):
        if "profile" in result[side]:
            profile = result[side]["profile"]
            lines += [f"  {side}: top ops by host time over {profile['steps']} profiled steps",
                      *profile["by_self_cpu"][:PROFILE_PRINTED]]
    q = result["ours_over_baseline"]
    lines.append(f"  ours/baseline: steps/s {q['steps_per_s']:.2f}x  samples/s {q['samples_per_s']:.2f}x  "
                 f"tokens/s {q['tokens_per_s']:.2f}x")
    return "\n".join(lines)
