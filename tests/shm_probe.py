"""Run under the DeepSpeed launcher: join the group as a run does, then print which DeepSpeed
shared-memory workspaces this rank has mapped and whether any of their names is left in /dev/shm,
into $SHM_PROBE_OUT/rank<r>.json (tests/distributed/test_shm_workspace.py)."""
import json
import os

import torch.distributed as dist

from trainer.distributed import setup_distributed, shm_workspace_path, teardown

info = setup_distributed()
dist.barrier()  # every rank has removed its own name
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1]
                     for line in f if "deepspeed_allreduce_buffer" in line})
report = {"rank": info.rank, "mapped": mapped,
          "names_left": [os.path.exists(shm_workspace_path(r)) for r in range(info.world_size)]}
with open(os.path.join(os.environ["SHM_PROBE_OUT"], f"rank{info.rank}.json"), "w") as f:
    json.dump(report, f)
teardown()
