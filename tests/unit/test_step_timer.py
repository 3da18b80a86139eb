"""trainer/step_timer.py on CPU: phases per step, a nested phase taken out of the one around it,
means over the steps since the last report, and the progress line's format."""
from __future__ import annotations

import time

import pytest
import torch

from trainer.step_timer import PHASES, StepTimer, format_breakdown


def sleep_ms(ms: float) -> None:
    time.sleep(ms / 1000)


def test_phases_nested_comm_and_reset():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(2):
        timer.start_step()
        with timer.phase("data"):
            sleep_ms(5)
        with timer.phase("backward"):
            sleep_ms(10)
            with timer.phase("comm"):  # DeepSpeed's reduction inside the backward
                sleep_ms(20)
        with timer.phase("optimizer"):
            sleep_ms(5)
    ms = timer.report()
    assert set(ms) == {*PHASES, "step"}
    assert ms["comm"] == pytest.approx(20, abs=15) and ms["backward"] == pytest.approx(10, abs=15)
    assert ms["comm"] > ms["backward"]  # the nested time is not counted twice
    assert ms["forward"] == 0 and ms["step"] == pytest.approx(sum(ms[p] for p in PHASES))
    assert timer.report() == {}  # reset: no step since


def test_off_timer_records_nothing():
    timer = StepTimer.off()
    timer.start_step()
    with timer.phase("forward"):
        pass
    assert timer.report() == {}


def test_gradient_reduction_is_timed_as_comm():
    class Engine:
        def allreduce_gradients(self):
            sleep_ms(10)
            return "reduced"

    engine, timer = Engine(), StepTimer(torch.device("cpu"))
    timer.watch_gradient_reduction(engine)
    timer.start_step()
    with timer.phase("backward"):
        assert engine.allreduce_gradients() == "reduced"
    ms = timer.report()
    assert ms["comm"] >= 9 and ms["backward"] < ms["comm"]


def test_breakdown_line():
    line = format_breakdown({"data": 1.0, "forward": 2.25, "backward": 3.0, "comm": 0.5, "optimizer": 4.0,
                             "step": 10.75})
    assert line == "data 1.0 fwd 2.2 bwd 3.0 comm 0.5 opt 4.0 ms"
