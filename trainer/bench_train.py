"""`vlpt bench train`: training throughput of a config, ours against the plain way, in one run.

Both sides train the same model (same initial weights) on the same pre-collated batches
(read once from the config's data, then cycled, so the input pipeline is not measured) in
the same task order, at the config's precision:

  ours      our model on the DeepSpeed engine of the config (ZeRO stage, fused optimizer,
            `train.compile` if set) through the run's `optimizer_step`: one host sync per step;
  baseline  the plain way: torch DDP without ZeRO, torch AdamW, autocast for bf16/fp16, eager,
            the losses read back (`.item()`) every micro-batch, and the family's plain model
            and ops (trainer/bench_families.py: UNITER's Hugging Face encoder, boolean-mask
            gathers and eager IPOT loop; ALBEF's same model).

MFU (CUDA, bf16/fp16 only) counts the useful model FLOPs, real tokens only (the recipe's
`step_flops`, trainer/bench_flops.py), over the dense tensor-core peak; `mfu_padded` is the
same at the padded layout. Each side's peak device memory is recorded on CUDA (null elsewhere).
`--sweep` (trainer/bench_sweep.py) repeats the comparison at several micro-batch sizes.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from trainer.bench_families import BenchFamily, bench_family
from trainer.bench_flops import NO_WORK, PEAK_FLOPS, BatchWork
from trainer.config import Config
from trainer.engine import BatchLayout, batch_layout, build_engine, param_groups
from trainer.recipes import recipe_class
from trainer.recipes.base import Recipe, StepContext
from trainer.step import optimizer_step
from trainer.task_mix import draw_task, mix_ratios, task_of


@dataclass(frozen=True)
class TrainBenchConfig:
    steps: int = 20
    """Timed optimizer steps per side."""
    warmup: int = 5
    """Untimed steps first (allocator, autotuning, compilation, DeepSpeed's first-step work)."""
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


@dataclass(frozen=True)
class Setup:
    """One measured configuration: the recipe (fresh: recipes hold per-run state), its layout,
    its prefetched batches and task order."""

    recipe: Recipe
    family: BenchFamily
    layout: BatchLayout
    batches: dict
    tasks: list[str]
    device: torch.device

    @property
    def cfg(self) -> Config:
        return self.recipe.cfg


# ---------------------------------------------------------------- timing


def figures(seconds: float, work: BatchWork, steps: int, peak: Optional[float], world: int) -> dict:
    """Rates of one side over the timed steps; MFU on a GPU of known peak."""
    s = max(seconds, 1e-9)
    out = {"steps_per_s": steps / s, "samples_per_s": work.samples / s, "tokens_per_s": work.tokens / s,
           "seconds": seconds, "steps": steps}
    if peak:
        out["mfu"] = work.flops / s / (peak * world)
        out["mfu_padded"] = work.padded_flops / s / (peak * world)
    return out


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


@dataclass
class Measured:
    seconds: float
    profile: dict
    peak_memory: Optional[int]
    """torch.cuda.max_memory_allocated over the side (model, engine, steps); None off CUDA."""
    parameters: Optional[int] = None
    """Of the model the side trained (what ZeRO partitions and the gradients' collectives carry)."""


def measure(setup: Setup, bench: TrainBenchConfig, run_step) -> Measured:
    tasks, device = setup.tasks, setup.device
    seconds = timed_loop(tasks, bench.warmup, device, run_step)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    table = profiled_steps(tasks[bench.warmup:][:bench.profile_steps], device, run_step) if bench.profile_steps else {}
    return Measured(seconds, table, peak)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def release(device: torch.device) -> None:
    """Free what the last side (or its out-of-memory error) left, so the next starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- the two sides


def run_ours(setup: Setup, model: nn.Module, bench: TrainBenchConfig) -> Measured:
    cfg, recipe, layout, device = setup.cfg, setup.recipe, setup.layout, setup.device
    if cfg.train.compile:
        from trainer.compile import compile_regions

        compile_regions(model, recipe)
    total = cfg.optim.total_steps or cfg.train.max_steps
    engine, _ = build_engine(model, cfg.optim, cfg.parallel, cfg.precision, layout, total, device)
    loaders = {key: CyclingLoader(b) for key, b in setup.batches.items()}
    steps = itertools.count()
    try:
        return measure(setup, bench, lambda key: optimizer_step(
            engine, recipe, loaders[key], task_of(key), layout, StepContext(next(steps), cfg.train.seed, device)))
    finally:
        engine.destroy()


def run_baseline(setup: Setup, model: nn.Module, bench: TrainBenchConfig) -> Measured:
    """The plain loop over the recipe's protocol (begin_step, forward_args, term_counts, finish), so
    every family's step does the same work as ours: each loss over its terms in the micro-batch."""
    from torch.nn.parallel import DistributedDataParallel

    cfg, recipe, layout, device = setup.cfg, setup.recipe, setup.layout, setup.device
    model = setup.family.plain_model(model).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.lr), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    loaders = {key: CyclingLoader(b) for key, b in setup.batches.items()}
    engine_view = SimpleNamespace(module=model)  # what a recipe's begin_step reads of an engine
    steps = itertools.count()

    def step(key: str) -> None:
        task, accum = task_of(key), layout.grad_accum
        micro = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in loaders[key].next().items()}
                 for _ in range(accum)]
        plan = recipe.begin_step(engine_view, micro, task, StepContext(next(steps), cfg.train.seed, device))
        means: dict[str, float] = {}
        for i, batch in enumerate(micro):
            counts = recipe.term_counts(batch, task)
            no_sync = ddp.no_sync() if i + 1 < accum else contextlib.nullcontext()
            with no_sync, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = ddp(batch, *plan.forward_args(i, batch)).losses
                terms = {k: v / max(counts[k], 1) / accum for k, v in losses.items()}
            scaler.scale(sum(terms.values())).backward()
            # the plain way logs every micro-batch's losses
            for k, v in zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()):
                means[k] = means.get(k, 0.0) + v
        plan.finish(means, False)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    with setup.family.plain_ops():
        return measure(setup, bench, step)


SIDES = {"ours": run_ours, "baseline": run_baseline}


def run_side(setup: Setup, runner, bench: TrainBenchConfig) -> Measured:
    """A fresh model from the seed, the recipe's state attached, then `runner`."""
    release(setup.device)
    torch.manual_seed(setup.cfg.train.seed)
    model = setup.recipe.build_model()
    setup.recipe.attach(model, setup.layout, setup.device)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = runner(setup, model, bench)
    measured.parameters = parameters
    return measured


# ---------------------------------------------------------------- batches and their work


def prefetch(recipe: Recipe, tok, layout: BatchLayout, rank: int, n_steps: int) -> dict:
    """`n_steps` optimizer steps' worth of this rank's micro-batches per mix key."""
    from trainer.run_setup import build_train_loaders

    loaders = build_train_loaders(recipe.cfg, recipe, tok, layout, rank, {})
    recipe.on_loaders(loaders, layout)  # e.g. ALBEF's alpha ramp, sized by the epoch
    return {key: [loader.next() for _ in range(n_steps * layout.grad_accum)] for key, loader in loaders.items()}


def timed_work(setup: Setup, warmup: int) -> tuple[BatchWork, int]:
    """(work, steps) of the timed steps over all ranks: the batches both sides read in those steps,
    this rank's taken as every rank's."""
    batches, accum, world = setup.batches, setup.layout.grad_accum, setup.layout.world_size
    work, steps, cursor = NO_WORK, 0, {key: 0 for key in batches}
    for i, key in enumerate(setup.tasks):
        step_batches = [batches[key][(cursor[key] + j) % len(batches[key])] for j in range(accum)]
        cursor[key] += accum
        if i >= warmup:
            steps += 1
            for b in step_batches:
                work = work + setup.recipe.step_flops(b, task_of(key))
    return scaled(work, world), steps


def scaled(work: BatchWork, k: int) -> BatchWork:
    return BatchWork(work.samples * k, work.tokens * k, work.padded_tokens * k, work.flops * k,
                     work.padded_flops * k)


def work_record(work: BatchWork, steps: int) -> dict:
    return {"timed_steps": steps, "samples": work.samples, "tokens": work.tokens,
            "padded_tokens": work.padded_tokens, "flops": work.flops, "padded_flops": work.padded_flops}


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def make_setup(cfg: Config, tok, info, bench: TrainBenchConfig) -> Setup:
    """A fresh recipe of `cfg`, its layout and this rank's prefetched batches; the task order."""
    from trainer.run_setup import validate_against_data

    recipe = recipe_class(cfg.model.arch)(cfg)
    if type(recipe).step_flops is Recipe.step_flops:
        raise ValueError(f"model.arch={cfg.model.arch!r}: its recipe does not count its model FLOPs "
                         "(Recipe.step_flops, trainer/bench_flops.py), which vlpt bench train needs for MFU")
    validate_against_data(cfg, recipe, tok)
    layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, info.world_size)
    batches = prefetch(recipe, tok, layout, info.rank, bench.batches_per_task)
    ratios = mix_ratios(cfg)
    tasks = [draw_task(cfg.train.seed, s, ratios) for s in range(bench.warmup + bench.steps)]
    return Setup(recipe, bench_family(cfg.model.arch), layout, batches, tasks, info.device)


def compare(setup: Setup, bench: TrainBenchConfig, runners: dict = SIDES) -> dict:
    """Both sides on `setup`: their figures, peak memory and the ours / baseline ratios."""
    work, steps = timed_work(setup, bench.warmup)
    peak = peak_flops(setup.device, setup.cfg.precision.dtype)
    out = {"work": work_record(work, steps)}
    for side, runner in runners.items():
        try:
            measured = run_side(setup, runner, bench)
        except torch.cuda.OutOfMemoryError as e:
            # One GPU: recorded, and the next side or point starts from freed memory. Several: the
            # other ranks wait in a collective this rank left; size the points to fit instead.
            message = str(e).strip().splitlines() or ["out of memory"]
            out[side] = {"oom": True, "error": message[0][:300]}
            continue
        finally:
            release(setup.device)
        out[side] = {**figures(measured.seconds, work, steps, peak, setup.layout.world_size),
                     "peak_memory_bytes": measured.peak_memory}
        out.setdefault("parameters", measured.parameters)
        if measured.profile:
            out[side]["profile"] = {"steps": bench.profile_steps, **measured.profile}
    out["ours_over_baseline"] = ratios(out["ours"], out["baseline"])
    return out


def ratios(ours: dict, baseline: dict) -> Optional[dict]:
    if "steps_per_s" not in ours or "steps_per_s" not in baseline:
        return None  # a side ran out of memory
    return {k: ours[k] / baseline[k] for k in ("steps_per_s", "samples_per_s", "tokens_per_s")}


def run_train_bench(cfg: Config, bench: TrainBenchConfig, count_only: bool = False) -> dict:
    """Collective under torchrun; every rank returns the same figures. `count_only`: the work of the
    timed steps (samples, tokens, useful and padded FLOPs) without training."""
    from data.tokenizer import tokenizer_from_config
    from trainer.distributed import setup_distributed

    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    tok = tokenizer_from_config(cfg.data.tokenizer)
    setup = make_setup(cfg, tok, info, bench)
    head = {"arch": cfg.model.arch, "world_size": info.world_size,
            "global_batch_size": setup.layout.global_batch_size, "micro_batch_size": setup.layout.micro_batch_size,
            "precision": cfg.precision.dtype, "zero_stage": cfg.parallel.zero_stage, "compile": cfg.train.compile,
            "tasks": dict(sorted(mix_ratios(cfg).items())), "timed_steps": bench.steps, "warmup_steps": bench.warmup}
    if count_only:
        work, steps = timed_work(setup, bench.warmup)
        return {**head, "work": work_record(work, steps)}
    return {**head, **compare(setup, bench)}


def side_line(side: str, r: dict) -> str:
    if r.get("oom"):
        return f"  {side:<9} out of memory"
    mfu = f", MFU {100 * r['mfu']:.1f}% (padded {100 * r['mfu_padded']:.1f}%)" if "mfu" in r else ""
    mem = f", peak {r['peak_memory_bytes'] / 2 ** 30:.1f} GiB" if r.get("peak_memory_bytes") else ""
    return (f"  {side:<9} {r['steps_per_s']:8.2f} steps/s {r['samples_per_s']:10.1f} samples/s "
            f"{r['tokens_per_s']:12.0f} tokens/s{mfu}{mem}")


def format_work(w: dict) -> str:
    return (f"  work of the {w['timed_steps']} timed steps: {w['samples']} samples, {w['tokens']} real tokens "
            f"({w['padded_tokens']} padded), {w['flops']:.4g} useful FLOPs ({w['padded_flops']:.4g} padded)")


def format_train_result(result: dict) -> str:
    lines = [f"bench train: {result['arch']}, world {result['world_size']}, global batch "
             f"{result['global_batch_size']}, {result['precision']}, ZeRO-{result['zero_stage']}, "
             f"{result['timed_steps']} timed steps", format_work(result["work"])]
    if "ours" not in result:
        return "\n".join(lines)
    lines += [side_line(side, result[side]) for side in ("ours", "baseline")]
    for side in ("ours", "baseline"):
        if "profile" in result[side]:
            profile = result[side]["profile"]
            lines += [f"  {side}: top ops by host time over {profile['steps']} profiled steps",
                      *profile["by_self_cpu"][:PROFILE_PRINTED]]
    q = result["ours_over_baseline"]
    if q:
        lines.append(f"  ours/baseline: steps/s {q['steps_per_s']:.2f}x  samples/s {q['samples_per_s']:.2f}x  "
                     f"tokens/s {q['tokens_per_s']:.2f}x")
    return "\n".join(lines)
