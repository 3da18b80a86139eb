"""`vlpt bench train --sweep T1,T2,...`: ours against the plain way at several micro-batch sizes.

Each point is a micro-batch of about T real tokens per GPU: micro-batch size = T // the mean real
tokens per sample (attention-mask ones: text + regions for UNITER, caption + image tokens for
ALBEF), measured on batches of the config's own size read first (averaged over the mix's tasks and
all ranks); global batch = micro x world, no accumulation (trainer/bench_families.py fits the rest
of the config, e.g. ALBEF's queue, and reads the batches in-process, shards drawn with replacement). Both sides run every point on the same batches. Per point and
side: steps/s, samples/s, tokens/s, MFU (useful and padded) on a known GPU, and the peak device
memory; a side that runs out of device memory is recorded as such and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from trainer.bench_families import bench_family
from trainer.bench_train import SIDES, TrainBenchConfig, compare, make_setup, release
from trainer.config import Config
from trainer.task_mix import mix_ratios, task_of

TOKEN_BASIS = "real tokens per sample: attention-mask ones (UNITER text + regions; ALBEF caption + image tokens)"


def mean_tokens_per_sample(cfg: Config, bench: TrainBenchConfig, tok, info) -> float:
    """Mean real tokens per sample of one step's worth of batches per task at the config's batch
    size, over all ranks (so every rank picks the same micro-batch sizes)."""
    from trainer.distributed import all_reduce_sum

    own = bench_family(cfg.model.arch).point_config(cfg, cfg.data.micro_batch_size, info.world_size)
    setup = make_setup(own, tok, info, dataclasses.replace(bench, batches_per_task=1))
    tokens = samples = 0
    for key, batches in setup.batches.items():
        for b in batches:
            work = setup.recipe.step_flops(b, task_of(key))
            tokens, samples = tokens + work.tokens, samples + work.samples
    total = all_reduce_sum(torch.tensor([tokens, samples], dtype=torch.float64, device=info.device)).tolist()
    return total[0] / max(total[1], 1.0)


def changed_keys(before: Config, after: Config) -> dict:
    """The `section.key` values a point changed (the batch sizes, ALBEF's queue, ...)."""
    out = {}
    for section in ("data", "optim", "model"):
        a, b = getattr(before, section), getattr(after, section)
        for f in dataclasses.fields(b):
            if getattr(a, f.name) != getattr(b, f.name):
                out[f"{section}.{f.name}"] = getattr(b, f.name)
    return out


def run_point(cfg: Config, bench: TrainBenchConfig, tok, info, tokens: int, micro: int,
              runners: Optional[dict] = None) -> dict:
    point_cfg = bench_family(cfg.model.arch).point_config(cfg, micro, info.world_size)
    point = {"micro_tokens": tokens, "micro_batch_size": micro, "global_batch_size": micro * info.world_size,
             "config_changes": changed_keys(cfg, point_cfg)}
    setup = make_setup(point_cfg, tok, info, bench)
    try:
        measured = compare(setup, bench, runners or SIDES)
        # below micro_batch_size only where bad samples were left out of a batch
        point["samples_per_micro_batch"] = measured["work"]["samples"] / max(
            measured["work"]["timed_steps"] * info.world_size, 1)
        return {**point, **measured}
    finally:
        del setup
        release(info.device)


def run_sweep(cfg: Config, bench: TrainBenchConfig, tokens: tuple[int, ...],
              on_point: Optional[Callable[[dict], None]] = None) -> dict:
    """Collective under torchrun; every rank returns the same figures. `on_point(result so far)`
    after each point (the CLI rewrites its record, so a sweep cut short keeps what it measured)."""
    from data.tokenizer import tokenizer_from_config
    from trainer.distributed import setup_distributed

    if not tokens or any(t < 1 for t in tokens):
        raise ValueError(f"bench train --sweep: positive token counts per micro-batch, e.g. 8192,16384; "
                         f"got {list(tokens)}")
    info = setup_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    tok = tokenizer_from_config(cfg.data.tokenizer)
    per_sample = mean_tokens_per_sample(cfg, bench, tok, info)
    release(info.device)
    points: list[dict] = []
    result = {"arch": cfg.model.arch, "world_size": info.world_size, "precision": cfg.precision.dtype,
              "zero_stage": cfg.parallel.zero_stage, "compile": cfg.train.compile,
              "tasks": dict(sorted(mix_ratios(cfg).items())), "timed_steps": bench.steps,
              "warmup_steps": bench.warmup, "complete": False,
              "sweep": {"tokens_per_sample": per_sample, "basis": TOKEN_BASIS, "points": points}}
    smallest = bench_family(cfg.model.arch).min_micro_batch
    for t in tokens:
        points.append(run_point(cfg, bench, tok, info, t, max(smallest, int(t // per_sample))))
        if on_point:
            on_point(result)
    result["complete"] = True
    return result


def _cell(r: dict, key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    value = r.get(key)
    return fmt.format(value * scale) if value is not None else "-"


def format_sweep(result: dict) -> str:
    sweep = result["sweep"]
    lines = [f"bench train --sweep: {result['arch']}, world {result['world_size']}, {result['precision']}, "
             f"ZeRO-{result['zero_stage']}, {result['timed_steps']} timed steps a point, "
             f"{sweep['tokens_per_sample']:.1f} real tokens per sample",
             f"{'tokens':>8} {'micro':>6} {'side':<9} {'steps/s':>8} {'samples/s':>10} {'tokens/s':>11} "
             f"{'MFU%':>6} {'padded%':>7} {'peak GiB':>8}"]
    for p in sweep["points"]:
        for i, side in enumerate(("ours", "baseline")):
            r = p[side]
            head = f"{p['micro_tokens']:>8} {p['micro_batch_size']:>6}" if i == 0 else " " * 15
            if r.get("oom"):
                lines.append(f"{head} {side:<9} out of memory")
                continue
            lines.append(f"{head} {side:<9} {r['steps_per_s']:8.2f} {r['samples_per_s']:10.1f} "
                         f"{r['tokens_per_s']:11.0f} {_cell(r, 'mfu', 100):>6} {_cell(r, 'mfu_padded', 100):>7} "
                         f"{_cell(r, 'peak_memory_bytes', 2 ** -30):>8}")
        q = p["ours_over_baseline"]
        lines.append(" " * 16 + (f"ours/baseline {q['samples_per_s']:.2f}x" if q else "ours/baseline: -"))
    return "\n".join(lines)
