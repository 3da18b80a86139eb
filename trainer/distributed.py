"""Process-group setup and the few collectives the trainer needs.

Works the same under `deepspeed`, `torchrun` and a plain `python` (one process):
the launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Initialise the default process group (also for one process, so collectives work)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = uses_cuda()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if world == 1 else "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        import deepspeed

        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            _init_elastic_group(backend, rank, world, timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        if not use_cuda:
            _unlink_shm_workspace()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, device=device)


SHM_DIR = "/dev/shm"


def shm_workspace_path(rank: int) -> str:
    """Where DeepSpeed's CPU accelerator keeps `rank`'s shared-memory all-reduce workspace (its
    ops/csrc/cpu/comm/shm.cpp names it by user, MASTER_ADDR, MASTER_PORT and rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def _unlink_shm_workspace() -> None:
    """Remove this rank's DeepSpeed shared-memory workspace name once every rank has mapped it.

    On the CPU accelerator, when all ranks are local (the DeepSpeed launcher sets LOCAL_SIZE),
    init_distributed creates a 66 MB workspace per rank in /dev/shm and maps its peers'; DeepSpeed
    never unlinks them, so each run left 66 MB per rank in memory until reboot. Every rank has mapped
    its peers' once init_distributed returned on all of them (the barrier); the mappings outlive the
    names."""
    if not hasattr(os, "getuid"):  # no POSIX shared memory names to clean (Windows)
        return
    path = shm_workspace_path(dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # not created: torchrun (no LOCAL_SIZE), or ranks on several nodes
        pass


def uses_cuda() -> bool:
    """Whether this process trains on a GPU (`DS_ACCELERATOR=cpu` keeps it on the CPU)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def _init_elastic_group(backend: str, rank: int, world: int, timeout: datetime.timedelta) -> None:
    """The default group under torchrun, its store keys prefixed by the restart attempt.

    After a restart (`--max-restarts`) the rendezvous store still holds the previous
    attempt's keys, among them each rank's gloo address: a rank that reads a stale one
    dials a dead process and the restarted job fails ("Connection refused") about half
    the time. A prefix per attempt keeps the attempts apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(backend, store=dist.PrefixStore(f"/vlpt/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place on a copy; no-op for one process."""
    out = t.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] of every rank, concatenated in rank order (no gradient); equal n on all ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.detach()
    out = torch.empty((dist.get_world_size() * t.size(0), *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.detach().contiguous())
    return out


def all_gather_varying_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """[n_r, ...] of every rank (n_r may differ), concatenated in rank order, and the n_r.
    The counts are known on the host: they go through the host group, then one all-gather of
    the padded rows."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.detach(), [t.size(0)]
    sizes = all_gather_host_ints(t.size(0))
    most = max(sizes)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.size(0)] = t.detach()
    rows = all_gather_rows(padded)  # [world * most, ...]
    return torch.cat([rows[r * most:r * most + n] for r, n in enumerate(sizes)]), sizes


_HOST_GROUP: dict[str, Any] = {}


def host_group():
    """A gloo group beside an NCCL default group, for values that live on the host: exchanging
    them there leaves the GPU streams alone (an NCCL exchange would be read back with a device
    synchronisation). None when the default group is gloo already. Collective on first use."""
    if dist.get_backend() == "gloo":
        return None
    if "group" not in _HOST_GROUP:
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")
    return _HOST_GROUP["group"]


def all_gather_host_ints(n: int) -> list[int]:
    """Every rank's host integer `n`, in rank order, without touching the device."""
    local = torch.tensor([n], dtype=torch.int64)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local, group=host_group())
    return [int(x) for x in out]


def all_gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """After a run that ended well on every rank: free what is unreachable, wait for all ranks, then
    take the process group down before the interpreter exits. A finished DeepSpeed engine sits in
    reference cycles with its optimizer's tensors and gloo work (tests/integration/test_pretrain_run.py);
    left to the interpreter's finalisation, freeing them (or gloo's threads) can abort a finished
    process with "terminate called without an active exception"."""
    gc.collect()
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
