"""`vlpt bench kernels`: the fused kernels against the ways they replace.

IPOT (and entropic Sinkhorn) on a grid of B x words x regions plus a ragged case:
ours (`kernels.ipot.ipot`, whatever the dispatch picks on this device), the eager
per-op torch loop as UNITER writes it (`ipot_reference`: ~10 small ops per
iteration, 50 iterations), and POT's batched solver at the same iteration count.
Masked gather on the same sizes (L = words + regions, hidden 768): ours forward +
backward vs `hidden[mask]` forward + backward. Medians per call in ms; on CUDA
each call is timed with events.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kernels import dispatch
from kernels.checks import tile_unsupported
from kernels.ipot import MAX_TILE, ipot, ipot_reference
from kernels.masked_gather import masked_gather
from kernels.ot import cosine_cost
from kernels.sinkhorn import sinkhorn, sinkhorn_reference

OPS = ("ipot", "sinkhorn", "gather")
POT_NOTE = ("POT 0.9.7's batched proximal solver builds its kernel as -(C + reg*log T)/reg where "
            "IPOT has -C/beta + log T, so its plan is not IPOT's: its figure is time only, for the "
            "same number of log-domain iterations")


@dataclass(frozen=True)
class KernelBenchConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    words: tuple[int, ...] = (20, 40, 60)
    regions: tuple[int, ...] = (36, 64, 100)
    ragged_batch: int = 128
    """Batch of the extra ragged case (12..max words, 10..max regions per example); 0: none."""
    hidden: int = 768
    iterations: int = 50
    beta: float = 0.5
    reg: float = 0.1
    """Sinkhorn's entropic weight."""
    mask_prob: float = 0.15
    reps: int = 20
    warmup: int = 3
    pot: bool = True
    ops: tuple[str, ...] = OPS
    seed: int = 0
    gather_dtype: str = field(default="")
    """"": bf16 on CUDA (the training precision), fp32 on CPU."""

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
        if min(self.batch_sizes + self.words + self.regions) < 1 or self.reps < 1:
            raise ValueError("batch sizes, words, regions and reps must be >= 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available here; use --device cpu")


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of one call in ms (CUDA: events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _pads(lengths: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=lengths.device)[None] >= lengths[:, None]  # [B, n] True at pad


def _cases(cfg: KernelBenchConfig) -> list[tuple[int, int, int, bool]]:
    grid = [(b, w, r, False) for b in cfg.batch_sizes for w in cfg.words for r in cfg.regions]
    if cfg.ragged_batch:
        grid.append((cfg.ragged_batch, max(cfg.words), max(cfg.regions), True))
    return grid


def _problem(cfg: KernelBenchConfig, b: int, nt: int, ni: int, ragged: bool, device: torch.device):
    """WRA-shaped costs: cosine cost of random states, pads at the end of each side."""
    g = torch.Generator().manual_seed(cfg.seed + b * 10007 + nt * 101 + ni)
    txt_len = torch.randint(min(12, nt), nt + 1, (b,), generator=g) if ragged else torch.full((b,), nt)
    img_len = torch.randint(min(10, ni), ni + 1, (b,), generator=g) if ragged else torch.full((b,), ni)
    txt = torch.randn(b, nt, cfg.hidden, generator=g).to(device)
    img = torch.randn(b, ni, cfg.hidden, generator=g).to(device)
    txt_pad, img_pad = _pads(txt_len.to(device), nt), _pads(img_len.to(device), ni)
    C = cosine_cost(txt, img).masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)  # [B, Nt, Ni]
    return C, txt_pad, img_pad


def _ours_path(tensors: tuple[torch.Tensor, ...], unsupported: Optional[str] = None) -> str:
    """Which code `ours` ran: the kernel, or the reference and why (the dispatch's own reasons)."""
    reason = unsupported or dispatch.device_unsupported(tensors, dispatch.kernel_mode())
    return "triton" if reason is None else f"torch reference ({reason})"


def _pot_solve(method: str, C: torch.Tensor, cfg: KernelBenchConfig) -> Callable[[], object]:
    from ot.batch import solve_batch

    b, n, m = C.shape
    a = torch.full((b, n), 1 / n, device=C.device, dtype=C.dtype)
    bb = torch.full((b, m), 1 / m, device=C.device, dtype=C.dtype)
    kw = (dict(reg=None, method="proximal", inner_reg=cfg.beta, inner_iter=1) if method == "proximal"
          else dict(reg=cfg.reg, method="log_sinkhorn"))

    def solve():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return solve_batch(C, a=a, b=bb, max_iter=cfg.iterations, tol=0, grad="detach", **kw)
    return solve


def _ratio(slow: Optional[float], fast: float) -> Optional[float]:
    return None if slow is None or fast <= 0 else slow / fast


def bench_ot(cfg: KernelBenchConfig, op: str, device: torch.device) -> list[dict]:
    rows = []
    for b, nt, ni, ragged in _cases(cfg):
        C, txt_pad, img_pad = _problem(cfg, b, nt, ni, ragged, device)
        if op == "ipot":
            ours = lambda: ipot(C, txt_pad, img_pad, cfg.beta, cfg.iterations)  # noqa: E731
            eager = lambda: ipot_reference(C, txt_pad, img_pad, cfg.beta, cfg.iterations)  # noqa: E731
            tensors = (C, txt_pad, img_pad)
        else:
            a = (~txt_pad).float() / (~txt_pad).sum(1, keepdim=True)  # [B, Nt] uniform, 0 at pads
            bb = (~img_pad).float() / (~img_pad).sum(1, keepdim=True)  # [B, Ni]
            ours = lambda: sinkhorn(a, bb, C, cfg.reg, cfg.iterations)  # noqa: E731
            eager = lambda: sinkhorn_reference(a, bb, C, cfg.reg, cfg.iterations)  # noqa: E731
            tensors = (a, bb, C)
        row = {"B": b, "words": nt, "regions": ni, "ragged": ragged,
               "ours_path": _ours_path(tensors, tile_unsupported(
                   tuple(t.dtype for t in tensors if t.is_floating_point()), nt, ni, MAX_TILE)),
               "ours_ms": median_ms(ours, device, cfg.reps, cfg.warmup),
               "eager_ms": median_ms(eager, device, cfg.reps, cfg.warmup), "pot_ms": None}
        if cfg.pot and not ragged:  # POT's batched solvers take uniform, unpadded problems only
            pot = _pot_solve("proximal" if op == "ipot" else "log_sinkhorn", C, cfg)
            row["pot_ms"] = median_ms(pot, device, cfg.reps, cfg.warmup)
        row["eager_over_ours"] = _ratio(row["eager_ms"], row["ours_ms"])
        row["pot_over_ours"] = _ratio(row["pot_ms"], row["ours_ms"])
        rows.append(row)
    return rows


def bench_gather(cfg: KernelBenchConfig, device: torch.device) -> list[dict]:
    dtype = {"": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[cfg.gather_dtype]
    rows = []
    for b, nt, ni, ragged in _cases(cfg):
        if ragged:
            continue  # the gather does not see padding
        length = nt + ni
        g = torch.Generator().manual_seed(cfg.seed + b * 7 + length)
        mask = torch.rand(b, length, generator=g) < cfg.mask_prob  # [B, L]
        index = mask.flatten().nonzero().squeeze(1).to(device)  # [N], as collate ships it
        mask = mask.to(device)
        hidden = torch.randn(b, length, cfg.hidden, generator=g).to(device, dtype).requires_grad_()
        grad_out = torch.randn(int(index.numel()), cfg.hidden, generator=g).to(device, dtype)

        def ours():
            return torch.autograd.grad(masked_gather(hidden, index), hidden, grad_out)

        def boolean_mask():
            return torch.autograd.grad(hidden[mask], hidden, grad_out)

        row = {"B": b, "L": length, "hidden": cfg.hidden, "dtype": str(dtype).replace("torch.", ""),
               "masked": int(index.numel()), "ours_path": _ours_path((hidden, index)),
               "ours_ms": median_ms(ours, device, cfg.reps, cfg.warmup),
               "boolean_mask_ms": median_ms(boolean_mask, device, cfg.reps, cfg.warmup)}
        row["boolean_mask_over_ours"] = _ratio(row["boolean_mask_ms"], row["ours_ms"])
        rows.append(row)
    return rows


def targets(result: dict, device: torch.device) -> dict:
    """The issue's GPU targets, evaluated only on a GPU."""
    if device.type != "cuda":
        return {"evaluated": False, "reason": f"the targets are for a GPU; this run was on {device.type}"}
    out: dict = {"evaluated": True}
    ipot_rows = [r for r in result.get("ipot", []) if (r["B"], r["words"], r["regions"], r["ragged"])
                 == (128, 60, 100, False)]
    if ipot_rows:
        r = ipot_rows[0]
        out["ipot_b128_60x100_us"] = 1e3 * r["ours_ms"]
        out["ipot_b128_60x100_speedup_vs_eager"] = r["eager_over_ours"]
        out["ipot_met"] = r["eager_over_ours"] >= 100 and r["ours_ms"] <= 0.030
    if result.get("gather"):
        out["gather_faster_everywhere"] = all(r["ours_ms"] < r["boolean_mask_ms"] for r in result["gather"])
    return out


def run_kernel_bench(cfg: KernelBenchConfig) -> dict:
    device = torch.device(cfg.device)
    result: dict = {"config": {k: v for k, v in cfg.__dict__.items()},
                    "kernels_mode": dispatch.kernel_mode()}
    for op in cfg.ops:
        result[op] = bench_gather(cfg, device) if op == "gather" else bench_ot(cfg, op, device)
    if cfg.pot and "ipot" in cfg.ops:
        result["pot_note"] = POT_NOTE
    result["targets"] = targets(result, device)
    return result


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_kernel_result(result: dict) -> str:
    lines = []
    for op in ("ipot", "sinkhorn"):
        if op in result:
            lines.append(f"{op} [{result[op][0]['ours_path']}]")
            lines.append("      B words regions         ours ms  eager ms   POT ms  eager/ours  POT/ours")
            for r in result[op]:
                shape = f"{r['B']:7d} {r['words']:5d} {r['regions']:7d} {'ragged' if r['ragged'] else '':6}"
                lines.append(f"{shape} {r['ours_ms']:9.3f} {r['eager_ms']:9.3f} {_fmt(r['pot_ms'], '8.3f'):>8}"
                             f" {_fmt(r['eager_over_ours'], '11.1f'):>11} {_fmt(r['pot_over_ours'], '9.1f'):>9}")
    if "gather" in result:
        lines.append(f"masked gather, forward + backward [{result['gather'][0]['ours_path']}]")
        lines.append("      B     L  masked   ours ms  hidden[mask] ms  hidden[mask]/ours")
        for r in result["gather"]:
            lines.append(f"{r['B']:7d} {r['L']:5d} {r['masked']:7d} {r['ours_ms']:9.3f} "
                         f"{r['boolean_mask_ms']:16.3f} {r['boolean_mask_over_ours']:18.2f}")
    lines.append(f"targets: {result['targets']}")
    return "\n".join(lines)
