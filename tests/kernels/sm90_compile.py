"""Compile every kernel for an H100 (sm_90) ahead of time and print ptxas's resource report.

No GPU is needed: Triton lowers to PTX and its bundled ptxas assembles it. Run in a
process *without* TRITON_INTERPRET (the kernels must be jitted for the compiler).
Prints one JSON object: {"<kernel> <variant>": {"registers": r, "spill_bytes": s}}.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kernels.checks import tile_warps
from kernels.ipot import _ipot_kernel
from kernels.masked_gather import _blocks, _gather_rows_kernel, _scatter_rows_kernel
from kernels.sinkhorn import _sinkhorn_kernel

ARCH = 90
OT_TILES = [(2, 2), (8, 64), (32, 64), (64, 64), (64, 128), (128, 64), (16, 512)]


def ptxas_report(ptx: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        log = subprocess.run([get_ptxas(ARCH).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a",
                              src.name, "-o", src.name + ".o"], capture_output=True, text=True, check=True).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)), "spill_bytes": sum(spills)}


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int) -> dict:
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
    return {**ptxas_report(kernel.asm["ptx"]), "num_warps": num_warps}


def main() -> None:
    out = {}
    for dtype in ("fp32", "bf16"):
        for bt, bi in OT_TILES:
            sig = {"c_ptr": f"*{dtype}", "txt_pad_ptr": "*u8", "img_pad_ptr": "*u8", "plan_ptr": "*fp32",
                   "dist_ptr": "*fp32", "nt": "i32", "ni": "i32", "stride_cb": "i32", "stride_ct": "i32",
                   "stride_ci": "i32", "beta": "fp32", "iterations": "i32", "k_inner": "i32",
                   "BLOCK_T": "constexpr", "BLOCK_I": "constexpr"}
            out[f"ipot {dtype} {bt}x{bi}"] = compile_report(
                _ipot_kernel, sig, {"BLOCK_T": bt, "BLOCK_I": bi}, tile_warps(bt * bi))
            sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "m_ptr": f"*{dtype}", "plan_ptr": "*fp32",
                   "dist_ptr": "*fp32", "n": "i32", "m": "i32", "stride_ab": "i32", "stride_bb": "i32",
                   "stride_mb": "i32", "stride_mn": "i32", "stride_mm": "i32", "reg": "fp32",
                   "iterations": "i32", "BLOCK_N": "constexpr", "BLOCK_M": "constexpr"}
            out[f"sinkhorn {dtype} {bt}x{bi}"] = compile_report(
                _sinkhorn_kernel, sig, {"BLOCK_N": bt, "BLOCK_M": bi}, tile_warps(bt * bi))
        for width in (768, 1024):
            rows, cols = _blocks(width)
            sig = {"src_ptr": f"*{dtype}", "index_ptr": "*i64", "out_ptr": f"*{dtype}", "n_rows": "i32",
                   "width": "i32", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr"}
            out[f"gather {dtype} h{width}"] = compile_report(
                _gather_rows_kernel, sig, {"BLOCK_N": rows, "BLOCK_H": cols}, 4)
            sig = {"grad_out_ptr": f"*{dtype}", "inverse_ptr": "*i32", "grad_in_ptr": f"*{dtype}",
                   "n_rows": "i32", "width": "i32", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"}
            out[f"scatter {dtype} h{width}"] = compile_report(
                _scatter_rows_kernel, sig, {"BLOCK_R": rows, "BLOCK_H": cols}, 4)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
