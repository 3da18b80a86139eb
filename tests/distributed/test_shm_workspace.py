"""DeepSpeed's CPU shared-memory workspaces: mapped by every rank, their names gone from /dev/shm
(trainer/distributed.py, _unlink_shm_workspace)."""
import json
import os
import sys

import pytest

from tests.conftest import REPO, free_port, subprocess_env

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.path.exists("/proc/self/maps"),
                                reason="needs Linux /dev/shm and /proc")


def test_deepspeed_launcher_run_leaves_no_shm_workspace_behind(tmp_path):
    import subprocess

    port = free_port()
    names = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)]
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(port), "--module", "tests.shm_probe"]
    proc = subprocess.run(cmd, cwd=REPO, env={**subprocess_env(), "SHM_PROBE_OUT": str(tmp_path)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["mapped"] == names  # DeepSpeed made both workspaces and every rank maps both ...
        assert r["names_left"] == [False, False]  # ... but no name is left once the group is up
    assert not any(os.path.exists(n) for n in names)
