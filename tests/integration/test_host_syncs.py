"""A CPU guard for a GPU property: one optimizer step reads device values on the host at most once
(the step's reduced stats, gradient norm and stop flag), for UNITER's four tasks and ALBEF, at
ZeRO-0 and ZeRO-2, counted with trainer/host_syncs.py's dispatch-level counter."""
from __future__ import annotations

import collections

import pytest
import torch

from tests.conftest import write_albef_config, write_tiny_config
from tests.engine_util import engine_from_config

pytestmark = pytest.mark.usefixtures("one_thread", "process_group")
UNITER_TASKS = {"mlm": 1, "itm": 1, "mrfr": 1, "mrc-kl": 1}


def count_step_syncs(config_path, overrides: list[str]) -> dict[str, "HostSyncCounter"]:
    """One warm-up step per mix key (the optimizer creates its state), then one counted step each."""
    from trainer.host_syncs import HostSyncCounter, host_tensors
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step
    from trainer.task_mix import task_of

    _, recipe, layout, loaders, engine = engine_from_config(config_path, overrides)
    counters, step, device = {}, 0, torch.device("cpu")
    for counted in (False, True):
        for key, loader in loaders.items():
            counter = HostSyncCounter(exempt=host_tensors(engine.optimizer))
            with counter if counted else _nothing():
                optimizer_step(engine, recipe, HostSideLoader(loader, counter), task_of(key), layout,
                               StepContext(step, 0, device))
            counters[key], step = counter, step + 1
    engine.destroy()
    return counters


class HostSideLoader:
    """The run's loader with its batch building not counted: DataLoader workers do it on the host."""

    def __init__(self, loader, counter) -> None:
        self.loader, self.counter = loader, counter

    def next(self):
        with self.counter.paused():
            return self.loader.next()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


ENGINES = [pytest.param(["--parallel.zero_stage=0"], id="zero0-fp32"),
           pytest.param(["--parallel.zero_stage=2"], id="zero2-fp32"),
           pytest.param(["--parallel.zero_stage=2", "--precision.dtype=bf16"], id="zero2-bf16")]


@pytest.mark.parametrize("overrides", ENGINES)
def test_uniter_step_reads_the_device_once(tmp_path, demo_data, overrides):
    path = write_tiny_config(tmp_path / "u.yaml", demo_data, tmp_path / "run", tasks=UNITER_TASKS,
                             optim={"grad_clip": 1.0})
    for key, counter in count_step_syncs(path, overrides).items():
        assert counter.count <= 1, f"{key}: {counter.count} host syncs in one optimizer step\n{counter.report()}"


@pytest.mark.parametrize("overrides", ENGINES)
def test_albef_step_reads_the_device_once(tmp_path, pixel_data, overrides):
    path = write_albef_config(tmp_path, pixel_data, "a", steps=4, optim={"grad_clip": 1.0})
    for key, counter in count_step_syncs(path, overrides).items():
        assert counter.count <= 1, f"{key}: {counter.count} host syncs in one optimizer step\n{counter.report()}"


def test_the_counter_sees_each_kind_of_host_read():
    from trainer.host_syncs import HostSyncCounter

    x = torch.arange(6.0)
    step = torch.tensor(3.0)
    with HostSyncCounter(exempt=[step]) as c:
        y = (x * 2 + 1).sum()  # no read
        y.item()
        float(x[0])
        bool(x[1] > 0)
        x.tolist()
        x[x > 2]
        torch.nonzero(x)
        step.item()  # exempt: lives on the host by design
    kinds = collections.Counter()
    for (what, _), n in c.sites.items():
        kinds[what] += n
    assert kinds == {"_local_scalar_dense": 3, "tolist": 1, "index": 1, "nonzero": 1}, c.report()
