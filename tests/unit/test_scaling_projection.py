"""benchmarks/scaling_projection.py: the ring-collective volumes of ZeRO-2 / ZeRO-3, the projected step,
samples/s and MFU with and without overlap, and how it reads one-point and sweep records."""
from __future__ import annotations

import json

import pytest

from benchmarks import scaling_projection as sp

# One H100 (989 TFLOP/s): 10 steps in 1 s, 100 samples and 39.56 TFLOP of useful work per step
# (MFU 39.56e12 / 0.1 s / 989e12 = 40%), a 100M-parameter model.
RECORD = {
    "benchmark": "train", "world_size": 1, "config": "unused.yaml", "parameters": 100_000_000,
    "device": {"gpu": "NVIDIA H100 80GB HBM3"},
    "ours": {"steps": 10, "seconds": 1.0, "samples_per_s": 1000.0},
    "work": {"timed_steps": 10, "samples": 1000, "flops": 98.9e12 * 10 * 0.4, "padded_flops": 98.9e12 * 10 * 0.5},
}


def write(tmp_path, record, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return str(path)


def test_ring_volumes_are_two_and_three_psi():
    # (N-1)/N of Psi bf16 elements per reduce-scatter or all-gather
    assert sp.comm_bytes(100, 8, 2) == pytest.approx(2 * 7 / 8 * 100 * 2)
    assert sp.comm_bytes(100, 8, 3) == pytest.approx(3 * 7 / 8 * 100 * 2)
    assert sp.comm_bytes(100, 1, 2) == 0.0


def test_projection_with_and_without_overlap(tmp_path):
    inp = sp.read_inputs(write(tmp_path, RECORD))
    assert (inp.step_s, inp.samples_per_gpu, inp.params) == (0.1, 100, 100_000_000)
    assert inp.mfu == pytest.approx(0.4)
    p = sp.project(inp, 64, 200, 2)
    # 2 * 63/64 * 1e8 * 2 bytes = 393.75 MB over 25 GB/s = 15.75 ms
    assert p.comm_bytes == pytest.approx(393.75e6) and p.comm_s == pytest.approx(15.75e-3)
    assert p.serial_step_s == pytest.approx(0.11575) and p.overlap_step_s == pytest.approx(0.1)
    assert sp.samples_per_s(inp, p, p.serial_step_s) == pytest.approx(64 * 100 / 0.11575)
    assert sp.mfu(inp, p.serial_step_s) == pytest.approx(0.4 * 0.1 / 0.11575)
    assert sp.mfu(inp, p.overlap_step_s) == pytest.approx(0.4)
    # communication longer than the compute: overlap hides the compute instead
    slow = sp.project(sp.Inputs("r", "g", 1e15, 0.001, 1, 1e9, 100_000_000), 512, 200, 3)
    assert slow.overlap_step_s == slow.comm_s > 0.001


def test_markdown_has_every_row_and_its_inputs(tmp_path):
    table = sp.markdown(sp.read_inputs(write(tmp_path, RECORD)))
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(sp.GPUS) * len(sp.LINKS_GBPS) * len(sp.ZERO_VOLUME) == 12
    assert rows[0].startswith("| 8 | 200 Gb/s | 2 | 350 | 14.0 | 114.0 |")
    assert "t_c = 100.0 ms" in table and "one-GPU MFU 40.00%" in table and "100,000,000" in table


def test_old_records_take_the_work_of_a_count_only_record(tmp_path, capsys):
    old = {k: v for k, v in RECORD.items() if k != "work"}
    with pytest.raises(ValueError, match="--count-only"):
        sp.read_inputs(write(tmp_path, old))
    count = write(tmp_path, {"work": RECORD["work"]}, "count.json")
    assert sp.read_inputs(write(tmp_path, old), count).flops_per_gpu == RECORD["work"]["flops"] / 10
    other = write(tmp_path, {"work": {**RECORD["work"], "samples": 999}}, "other.json")
    with pytest.raises(ValueError, match="not the same batches"):
        sp.read_inputs(write(tmp_path, old), other)
    assert sp.main([write(tmp_path, old), "--work", count]) == 0
    assert "| 512 | 400 Gb/s | 3 |" in capsys.readouterr().out


def test_sweep_records_project_from_their_fastest_point(tmp_path):
    def point(tokens, samples_per_s, oom=False):
        ours = {"oom": True} if oom else {"steps": 10, "seconds": 1000 / samples_per_s, "samples_per_s": samples_per_s}
        return {"micro_tokens": tokens, "ours": ours, "work": RECORD["work"]}

    sweep = {**{k: v for k, v in RECORD.items() if k not in ("ours", "work")},
             "sweep": {"points": [point(8192, 500.0), point(16384, 2000.0), point(32768, 0, oom=True)]}}
    path = write(tmp_path, sweep)
    assert sp.read_inputs(path).step_s == pytest.approx(0.05)
    assert sp.read_inputs(path, point=8192).step_s == pytest.approx(0.2)
    with pytest.raises(ValueError, match="points that ran are \\[8192, 16384\\]"):
        sp.read_inputs(path, point=32768)


def test_refuses_multi_gpu_records_and_unknown_devices(tmp_path):
    with pytest.raises(ValueError, match="one-GPU record"):
        sp.read_inputs(write(tmp_path, {**RECORD, "world_size": 8}))
    with pytest.raises(ValueError, match="no known bf16 peak"):
        sp.read_inputs(write(tmp_path, {**RECORD, "device": {"cpu": "x86_64"}}))
