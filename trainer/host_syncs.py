"""Count the places a piece of code would make the host wait for a GPU, by running it on any device.

On CUDA the host waits whenever it reads a device value (`.item()`, `float(t)`, `if t:`, `.tolist()`,
`.numpy()`, `.cpu()`) or runs an op whose output shape depends on the values (`nonzero`, boolean
indexing, `masked_select`, `unique`, `repeat_interleave` without `output_size`). This counter sees
those calls at the dispatcher and at the Python API, so it counts them on CPU too, where nothing
waits: a CPU test guards a GPU property. Reads of tensors that live on the host by design (the
optimizer's `step` counters, which torch keeps on the CPU unless `capturable`) are not counted.
Not visible on CPU: a blocking copy *to* the GPU from pageable memory (`torch.tensor(v, device=...)`,
`.to(device)`), which also synchronises the stream; the step's code uses `torch.full` on the device
or pinned, non-blocking copies (`trainer/step.py: host_to_device`) for those.
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Iterable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

VALUE_READS = {"_local_scalar_dense"}
DATA_DEPENDENT_SHAPES = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                         "nonzero_static_fallback"}
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def host_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter `step` counters that live on the host (torch's default)."""
    return [s["step"] for s in optimizer.state.values()
            if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu"]


class HostSyncCounter:
    """`with HostSyncCounter() as c: ...` then `c.count` and `c.sites` (op and caller, for a report)."""

    def __init__(self, exempt: Iterable[torch.Tensor] = ()) -> None:
        self._exempt = {t.data_ptr() for t in exempt}
        self.sites: collections.Counter = collections.Counter()
        self._modes = (_FunctionLevel(self), _DispatchLevel(self))
        self._paused = False

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __enter__(self) -> "HostSyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not counting: for host-side work inside the counted code (a loader building a batch in
        the process, which DataLoader workers do elsewhere in a real run)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def record(self, what: str, tensor: Optional[torch.Tensor]) -> None:
        if self._paused or isinstance(tensor, torch.Tensor) and tensor.data_ptr() in self._exempt:
            return
        self.sites[(what, _caller())] += 1

    def report(self) -> str:
        return "\n".join(f"{n:4d} {what} at {site}" for (what, site), n in self.sites.most_common())


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.counter.record(func.__name__, args[0] if args else None)
        return func(*args, **(kwargs or {}))


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in VALUE_READS or name in DATA_DEPENDENT_SHAPES or _syncing_variant(name, args, kwargs or {}):
            self.counter.record(name, args[0] if args else None)
        return func(*args, **(kwargs or {}))


def _syncing_variant(name: str, args: tuple, kwargs: dict) -> bool:
    """Ops that synchronise only in some forms: boolean-mask indexing, `repeat_interleave` of a
    tensor of repeats without `output_size`."""
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    if name == "repeat_interleave":
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None and (
            len(args) == 1 or isinstance(args[1], torch.Tensor))
    return False


def _caller() -> str:
    """The innermost frame outside torch's own machinery and this module."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("host_syncs.py"):
            return f"{path.rsplit('/site-packages/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"
