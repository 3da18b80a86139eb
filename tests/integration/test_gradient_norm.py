"""trainer/gradients.py: the step's one gradient-norm reduction is the global norm at ZeRO-0 and
ZeRO-2 alike, the trainer's clip at ZeRO-2 trains as DeepSpeed's clip at ZeRO-0, and an inf in
one gradient (finite loss) skips the step on the norm alone."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import NO_DROPOUT, write_tiny_config
from tests.engine_util import engine_from_config, snapshot

pytestmark = pytest.mark.usefixtures("one_thread", "process_group")
STEPS = 4


def train(tmp_path, demo_data, zero_stage: int, grad_clip: float, poison_step: int = -1, accum: int = 1):
    """(StepStats of each step, final weights) of STEPS MLM steps of `accum` micro-batches of 8."""
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step

    path = write_tiny_config(tmp_path / f"z{zero_stage}.yaml", demo_data, tmp_path / "run", model=NO_DROPOUT,
                             tasks={"mlm": 1}, parallel={"zero_stage": zero_stage},
                             optim={"grad_clip": grad_clip, "warmup_steps": 0, "global_batch_size": 8 * accum})
    _, recipe, layout, loaders, engine = engine_from_config(path)
    weight = engine.module.uniter.embeddings.word_embeddings.weight
    results = []
    for step in range(STEPS):
        hook = weight.register_hook(lambda g: g * math.inf) if step == poison_step else None
        results.append(optimizer_step(engine, recipe, loaders["mlm"], "mlm", layout,
                                      StepContext(step, 0, torch.device("cpu"))))
        if hook:
            hook.remove()
    weights = snapshot(engine.module)
    engine.destroy()
    return results, weights


@pytest.mark.parametrize("accum", [1, 2])
def test_zero2_norm_and_clip_match_zero0(tmp_path, demo_data, accum):
    """A clip small enough to act on every step: the trainer's clip (ZeRO-2) and DeepSpeed's (ZeRO-0)
    give the same norms, losses and weights, with gradient accumulation too."""
    zero0, w0 = train(tmp_path, demo_data, 0, grad_clip=0.05, accum=accum)
    zero2, w2 = train(tmp_path, demo_data, 2, grad_clip=0.05, accum=accum)
    for a, b in zip(zero0, zero2):
        assert a.grad_norm > 0.05 and not a.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
        assert b.means["loss"] == pytest.approx(a.means["loss"], rel=1e-5)
    for name in w0:
        torch.testing.assert_close(w2[name], w0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_norm_is_the_norm_of_the_gradient(tmp_path, demo_data):
    """Without a clip the first step's norm is the norm of the parameters' gradient (ZeRO-0)."""
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step

    path = write_tiny_config(tmp_path / "n.yaml", demo_data, tmp_path / "run", model=NO_DROPOUT,
                             tasks={"mlm": 1}, optim={"grad_clip": 0.0})
    _, recipe, layout, loaders, engine = engine_from_config(path)
    seen, update = [], engine.step

    def step_reading_the_gradients():  # the gradients as they reach the update
        seen.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in engine.module.parameters()
                                  if p.grad is not None)))
        update()

    engine.step = step_reading_the_gradients
    stats = optimizer_step(engine, recipe, loaders["mlm"], "mlm", layout, StepContext(0, 0, torch.device("cpu")))
    engine.destroy()
    assert len(seen) == 1 and seen[0] > 0
    assert stats.grad_norm == pytest.approx(seen[0], rel=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_an_inf_gradient_skips_the_step(tmp_path, demo_data, zero_stage):
    """Step 1's loss is finite but one gradient is inf: the norm says so, every rank skips the step,
    and the weights stay finite."""
    results, weights = train(tmp_path, demo_data, zero_stage, grad_clip=1.0, poison_step=1)
    assert [r.skipped for r in results] == [False, True, False, False]
    assert math.isfinite(results[1].means["loss"]) and not math.isfinite(results[1].grad_norm)
    assert all(math.isfinite(r.grad_norm) for i, r in enumerate(results) if i != 1)
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
