"""The dispatch switch: which path runs under VLPT_KERNELS, and the reasons it gives."""
from __future__ import annotations

import pytest
import torch

import kernels.ipot as ipot_mod
import kernels.masked_gather as gather_mod
import kernels.sinkhorn as sinkhorn_mod
from kernels import dispatch
from kernels.ipot import ipot
from kernels.masked_gather import masked_gather
from kernels.sinkhorn import sinkhorn


class KernelLaunched(Exception):
    pass


@pytest.fixture
def launches_raise(monkeypatch):
    """Make every kernel launcher raise, to see which path a call takes."""
    def boom(*args, **kwargs):
        raise KernelLaunched
    for mod, name in ((ipot_mod, "ipot_triton"), (sinkhorn_mod, "sinkhorn_triton"),
                      (gather_mod, "gather_rows_triton")):
        monkeypatch.setattr(mod, name, boom)


def small_problem(nt=5, ni=6, dtype=torch.float32):
    C = torch.rand(2, nt, ni, dtype=dtype)
    return C, torch.zeros(2, nt, dtype=torch.bool), torch.zeros(2, ni, dtype=torch.bool)


def call_all_ops():
    ipot(*small_problem())
    a = torch.full((2, 3), 1 / 3)
    sinkhorn(a, a, torch.rand(2, 3, 3), 0.1, 5)
    masked_gather(torch.randn(2, 3, 4), torch.tensor([0, 4]))


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("VLPT_KERNELS", "fast")
    with pytest.raises(ValueError, match="VLPT_KERNELS='fast' is not one of auto, on, off"):
        ipot(*small_problem())


@pytest.mark.parametrize("mode", ["off", "auto", "", " AUTO "])
def test_off_and_auto_on_cpu_use_the_reference(monkeypatch, launches_raise, mode):
    """`auto` never picks Triton's interpreter; `off` never picks a kernel."""
    monkeypatch.setenv("VLPT_KERNELS", mode)
    call_all_ops()


def test_on_launches_the_kernels_in_the_interpreter(monkeypatch, launches_raise):
    if not dispatch.INTERPRETED:
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setenv("VLPT_KERNELS", "on")
    with pytest.raises(KernelLaunched):
        ipot(*small_problem())
    with pytest.raises(KernelLaunched):
        masked_gather(torch.randn(2, 3, 4), torch.tensor([0, 4]))


@pytest.mark.parametrize("problem,needle", [
    (dict(dtype=torch.float64), "torch.float64 inputs"),
    (dict(nt=65, ni=100), "65x100 problem pads to a 16384-element tile, over the on-chip limit of 8192"),
])
def test_op_limits_fall_back_in_auto_and_raise_in_on(monkeypatch, launches_raise, problem, needle):
    C, txt_pad, img_pad = small_problem(**problem)
    monkeypatch.setenv("VLPT_KERNELS", "auto")
    T, d = ipot(C, txt_pad, img_pad)  # the reference
    assert T.dtype == (torch.float64 if C.dtype == torch.float64 else torch.float32)
    monkeypatch.setenv("VLPT_KERNELS", "on")
    with pytest.raises(ValueError, match=f"ipot kernel cannot run: .*{needle}.*Unset VLPT_KERNELS"):
        ipot(C, txt_pad, img_pad)


def test_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    reason = dispatch.device_unsupported((torch.zeros(1),), "on")
    assert "TRITON_INTERPRET=1" in reason and "after Triton is imported has no effect" in reason
    monkeypatch.setenv("VLPT_KERNELS", "on")
    with pytest.raises(ValueError, match="masked_gather kernel cannot run: CPU tensors need"):
        masked_gather(torch.randn(2, 3, 4), torch.tensor([0, 4]))


def test_missing_triton_and_mixed_devices_are_explained(monkeypatch):
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert "several devices (cpu, meta)" in dispatch.device_unsupported((cpu, meta), "on")
    monkeypatch.setattr(dispatch, "triton", None)
    assert dispatch.device_unsupported((cpu,), "on") == "Triton is not installed on this platform"
    monkeypatch.setenv("VLPT_KERNELS", "auto")
    call_all_ops()  # every op still runs, on its reference


@pytest.mark.parametrize("call,needle", [
    (lambda: masked_gather(torch.randn(2, 3, 4), torch.tensor([0.0, 1.0])), "index must be a 1-D integer"),
    (lambda: masked_gather(torch.randn(2, 3, 4), torch.tensor([True, False])), "index must be a 1-D integer"),
    (lambda: masked_gather(torch.randn(3, 4), torch.tensor([0])), r"hidden must be \[B, L, H\]"),
    (lambda: sinkhorn(torch.rand(2, 3), torch.rand(2, 4), torch.rand(2, 3, 4), 0.0, 5), "reg must be > 0"),
    (lambda: ipot(torch.rand(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool),
                  torch.zeros(2, 4, dtype=torch.bool), iterations=0), "iterations and k must be >= 1"),
])
def test_bad_arguments_are_refused_before_dispatch(monkeypatch, call, needle):
    monkeypatch.setenv("VLPT_KERNELS", "on")
    with pytest.raises(ValueError, match=needle):
        call()


def test_everything_imports_and_runs_without_triton(tmp_path):
    """Platforms without Triton wheels (macOS): the kernels' modules import, ops use the references."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch\n"
            "from kernels import triton_jit\n"
            "from kernels.ipot import ipot\n"
            "from kernels.masked_gather import masked_gather\n"
            "from kernels.sinkhorn import sinkhorn\n"
            "assert triton_jit.triton is None and not triton_jit.INTERPRETED\n"
            "T, d = ipot(torch.rand(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool))\n"
            "a = torch.full((1, 3), 1 / 3)\n"
            "P, _ = sinkhorn(a, a, torch.rand(1, 3, 3), 0.1, 5)\n"
            "out = masked_gather(torch.randn(2, 3, 4), torch.tensor([1, 5]))\n"
            "print('ok', tuple(T.shape), tuple(P.shape), tuple(out.shape))\n")
    env = {**subprocess_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok (2, 4, 3) (1, 3, 3) (2, 4)"
