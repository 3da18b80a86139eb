"""Acceptance: two "nodes" on loopback (`torchrun --nnodes 2`, c10d rendezvous, one process
each) train 10 steps with the same losses as one process at the same global batch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, run_vlpt, step_losses, subprocess_env, write_equivalence_config

pytestmark = pytest.mark.slow


def config(tmp_path, demo_data, name):
    return write_equivalence_config(tmp_path, demo_data, name, max_steps=10)


def test_two_nodes_c10d_rendezvous_match_one_process(tmp_path, demo_data):
    run_vlpt(["pretrain", "--config", str(config(tmp_path, demo_data, "one"))])
    cfg = config(tmp_path, demo_data, "nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=vlpt-two-nodes",
         "-m", "vlpt", "pretrain", "--config", str(cfg)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert (summary["world_size"], summary["grad_accum"], summary["global_batch_size"]) == (2, 1, 16)
    ref, got = step_losses(tmp_path / "one"), step_losses(tmp_path / "nodes")
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
