"""Projected data-parallel throughput and MFU of a one-GPU `vlpt bench train` record under ZeRO-2 and
ZeRO-3 at 8, 64 and 512 GPUs over 200 and 400 Gb/s per GPU (docs/benchmarks.md, "Scaling projection").

Weak scaling: every GPU keeps the measured micro-batch and compute time t_c (ours, seconds per step
on one GPU) and adds the bytes its collectives move per step, with ring algorithms over N GPUs
(ZeRO paper, Rajbhandari et al. 2020, section 7):

    ZeRO-2  reduce-scatter of the gradients + all-gather of the updated parameters: 2 (N-1)/N Psi b bytes
    ZeRO-3  the same + a second all-gather of the parameters (forward and backward):  3 (N-1)/N Psi b bytes

Psi the trainable parameters, b = 2 bytes (bf16). t_comm = bytes / (link Gb/s / 8); the step takes
t_c + t_comm without overlap and max(t_c, t_comm) with perfect overlap; samples/s = N x samples
per GPU per step / step, MFU = useful FLOPs per GPU per step / step / peak. Bandwidth only: no
latency term (2 (N-1) alpha per ring collective; NCCL's trees and large buckets keep it small),
no NVLink inside a node (the 8-GPU rows are as if each GPU had only its network link), no
slow-down of the compute by the communication kernels.

    python benchmarks/scaling_projection.py benchmarks/results/train-h200-uniter-base-bf16-zero2.json \\
        --work benchmarks/results/train-count-uniter-base-bf16.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GPUS = (8, 64, 512)
LINKS_GBPS = (200, 400)
ZERO_VOLUME = {2: 2, 3: 3}
"""ZeRO stage -> multiples of (N-1)/N Psi b each GPU sends (and receives) per step."""
BYTES_PER_ELEMENT = 2  # bf16 gradients and parameters


@dataclass(frozen=True)
class Inputs:
    record: str
    gpu: str
    peak: float
    """Dense bf16 FLOP/s of one GPU."""
    step_s: float
    """t_c: measured seconds per optimizer step on one GPU (ours)."""
    samples_per_gpu: float
    """Per step."""
    flops_per_gpu: float
    """Useful model FLOPs per step (real tokens only)."""
    params: int

    @property
    def mfu(self) -> float:
        return self.flops_per_gpu / self.step_s / self.peak


@dataclass(frozen=True)
class Projection:
    gpus: int
    gbps: int
    zero: int
    comm_bytes: float
    comm_s: float
    serial_step_s: float
    overlap_step_s: float


def comm_bytes(params: int, gpus: int, zero: int) -> float:
    """Bytes each GPU sends per step with ring collectives (module docstring)."""
    return ZERO_VOLUME[zero] * (gpus - 1) / gpus * params * BYTES_PER_ELEMENT


def project(inp: Inputs, gpus: int, gbps: int, zero: int) -> Projection:
    volume = comm_bytes(inp.params, gpus, zero)
    comm_s = volume / (gbps * 1e9 / 8)
    return Projection(gpus, gbps, zero, volume, comm_s, inp.step_s + comm_s, max(inp.step_s, comm_s))


def samples_per_s(inp: Inputs, p: Projection, step_s: float) -> float:
    return p.gpus * inp.samples_per_gpu / step_s


def mfu(inp: Inputs, step_s: float) -> float:
    return inp.flops_per_gpu / step_s / inp.peak


# ---------------------------------------------------------------- reading a record


def peak_of(record: dict) -> float:
    from trainer.bench_flops import PEAK_FLOPS

    gpu = (record.get("device") or {}).get("gpu", "")
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
    if peak is None:
        raise ValueError(f"no known bf16 peak for device {gpu!r} (trainer/bench_flops.PEAK_FLOPS): project from a "
                         "record measured on an H100, H200 or A100")
    return peak


def measured_side(record: dict, point: Optional[int]) -> tuple[dict, Optional[dict]]:
    """(ours' figures, the work of the timed steps) of a one-point record or of a sweep point
    (default: the point where ours trained the most samples/s)."""
    if "sweep" not in record:
        return record["ours"], record.get("work")
    points = [p for p in record["sweep"]["points"] if not p["ours"].get("oom")]
    if not points:
        raise ValueError("every point of this sweep ran out of memory on ours: nothing to project from")
    if point is not None:
        chosen = [p for p in points if p["micro_tokens"] == point]
        if not chosen:
            raise ValueError(f"--point {point}: the sweep's points that ran are "
                             f"{[p['micro_tokens'] for p in points]}")
        best = chosen[0]
    else:
        best = max(points, key=lambda p: p["ours"]["samples_per_s"])
    return best["ours"], best["work"]


def count_params(config: str) -> int:
    """Trainable parameters of the record's model, built on the meta device (no memory, no init cost)."""
    import torch

    from trainer.config import load_config
    from trainer.recipes import recipe_class

    cfg = load_config(config, [])
    with torch.device("meta"):
        model = recipe_class(cfg.model.arch)(cfg).build_model()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def read_inputs(path: str, work_path: Optional[str] = None, params: Optional[int] = None,
                point: Optional[int] = None) -> Inputs:
    record = json.loads(Path(path).read_text())
    if record.get("world_size", 1) != 1:
        raise ValueError(f"{path}: measured on {record['world_size']} GPUs; project from a one-GPU record "
                         "(its step time has no communication in it)")
    ours, work = measured_side(record, point)
    if work is None:
        if not work_path:
            raise ValueError(f"{path} predates the useful-FLOP count: give --work, the record of `vlpt bench train "
                             f"--config {record.get('config')} --count-only` with the same --steps/--warmup")
        work = json.loads(Path(work_path).read_text())["work"]
        if work["samples"] != round(ours["samples_per_s"] * ours["seconds"]):
            raise ValueError(f"--work {work_path} counts {work['samples']} samples, the record timed "
                             f"{ours['samples_per_s'] * ours['seconds']:.0f}: not the same batches")
    steps, peak = ours["steps"], peak_of(record)
    n_params = params or record.get("parameters") or count_params(record["config"])
    return Inputs(path, record["device"]["gpu"], peak, ours["seconds"] / steps,
                  work["samples"] / steps, work["flops"] / steps, int(n_params))


# ---------------------------------------------------------------- the table


def markdown(inp: Inputs) -> str:
    lines = [
        f"Inputs: `{inp.record}` on one {inp.gpu} (peak {inp.peak / 1e12:.0f} TFLOP/s bf16); "
        f"t_c = {inp.step_s * 1e3:.1f} ms a step; {inp.samples_per_gpu:.0f} samples and "
        f"{inp.flops_per_gpu / 1e12:.3f} TFLOP (useful) per GPU per step; one-GPU MFU {100 * inp.mfu:.2f}%; "
        f"Psi = {inp.params:,} parameters x {BYTES_PER_ELEMENT} bytes.",
        "",
        "| GPUs | link | ZeRO | MB sent / GPU / step | t_comm ms | step ms (serial) | samples/s (serial) "
        "| MFU (serial) | step ms (overlap) | samples/s (overlap) | MFU (overlap) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for gpus in GPUS:
        for gbps in LINKS_GBPS:
            for zero in ZERO_VOLUME:
                p = project(inp, gpus, gbps, zero)
                lines.append(
                    f"| {gpus} | {gbps} Gb/s | {zero} | {p.comm_bytes / 1e6:,.0f} | {p.comm_s * 1e3:.1f} | "
                    f"{p.serial_step_s * 1e3:.1f} | {samples_per_s(inp, p, p.serial_step_s):,.0f} | "
                    f"{100 * mfu(inp, p.serial_step_s):.2f}% | {p.overlap_step_s * 1e3:.1f} | "
                    f"{samples_per_s(inp, p, p.overlap_step_s):,.0f} | {100 * mfu(inp, p.overlap_step_s):.2f}% |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a one-GPU `vlpt bench train` record (one point or a --sweep)")
    ap.add_argument("--work", help="for records without `work`: the `--count-only` record of the same batches")
    ap.add_argument("--params", type=int, help="trainable parameters (default: the record's, else built from its config)")
    ap.add_argument("--point", type=int, help="sweep records: the micro_tokens of the point (default: fastest)")
    args = ap.parse_args(argv)
    try:
        print(markdown(read_inputs(args.record, args.work, args.params, args.point)))
    except ValueError as e:
        ap.exit(2, f"scaling_projection: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
