"""`vlpt bench kernels`: runs on CPU, writes the JSON record, and refuses bad arguments."""
import json

import pytest

from kernels.triton_jit import INTERPRETED
from vlpt.cli import main

TINY = ["bench", "kernels", "--device", "cpu", "--batch-sizes", "2,3", "--words", "3", "--regions", "4,9",
        "--ragged-batch", "3", "--hidden", "8", "--iterations", "5", "--reps", "2", "--warmup", "1"]


def test_bench_kernels_writes_a_record(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLPT_KERNELS", raising=False)
    out = tmp_path / "k.json"
    assert main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "masked gather, forward + backward" in printed and f"written to {out}" in printed
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "kernels" and rec["device"]["cores"] >= 1 and "command" in rec
    assert rec["commit"] is None or len(rec["commit"]) == 40
    for op in ("ipot", "sinkhorn"):
        shapes = [(r["B"], r["words"], r["regions"], r["ragged"]) for r in rec[op]]
        assert shapes == [(2, 3, 4, False), (2, 3, 9, False), (3, 3, 4, False), (3, 3, 9, False),
                          (3, 3, 9, True)]
        for r in rec[op]:
            assert r["ours_ms"] > 0 and r["eager_ms"] > 0 and r["eager_over_ours"] > 0
            assert (r["pot_ms"] is None) == r["ragged"]  # POT's batched solvers take no padding
            assert r["ours_path"].startswith("torch reference (")  # auto on CPU: never the interpreter
    assert [(r["B"], r["L"]) for r in rec["gather"]] == [(2, 7), (2, 12), (3, 7), (3, 12)]
    assert all(r["boolean_mask_over_ours"] > 0 for r in rec["gather"])
    assert rec["targets"] == {"evaluated": False, "reason": "the targets are for a GPU; this run was on cpu"}
    assert "POT 0.9.7" in rec["pot_note"]


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter")
def test_bench_kernels_times_the_kernels_when_they_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPT_KERNELS", "on")
    out = tmp_path / "k.json"
    assert main([*TINY, "--batch-sizes", "2", "--regions", "4", "--ragged-batch", "0", "--no-pot",
                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["ours_path"] for op in ("ipot", "sinkhorn", "gather") for r in rec[op]] == ["triton"] * 3
    assert rec["kernels_mode"] == "on" and "pot_note" not in rec


@pytest.mark.parametrize("args,needle", [
    (["--ops", "ipot,softmax"], "unknown ops ['softmax']"),
    (["--words", "0"], "must be >= 1"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bench_kernels_bad_arguments(args, needle, capsys):
    import torch
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main([*TINY, *args]) == 2
    assert needle in capsys.readouterr().err


def test_bench_kernels_bad_integer_list(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--words", "a,b"])
    assert exc.value.code == 2 and "expected comma-separated integers" in capsys.readouterr().err
