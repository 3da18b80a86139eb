"""Acceptance (issue 6, item 2): a NaN/inf loss skips its optimizer step at every ZeRO stage
and precision (weights and Adam state as if the step had not been there), is counted, and
`train.max_consecutive_nonfinite` of them in a row end the run with one error line."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import run_vlpt, step_losses, write_tiny_config
from tests.engine_util import ListLoader, demo_region_samples, snapshot, tiny_uniter, uniter_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MICRO, ACCUM = 4, 2


@pytest.fixture(scope="module")
def steps(demo_data, tok):
    """Three optimizer steps of ACCUM MLM micro-batches each."""
    from data.collate import collate_mlm

    samples = demo_region_samples(demo_data, tok, 3 * MICRO * ACCUM)
    rng = np.random.default_rng(0)
    batches = [collate_mlm(samples[i:i + MICRO], rng, tok) for i in range(0, len(samples), MICRO)]
    return [batches[s * ACCUM:(s + 1) * ACCUM] for s in range(3)]


def poison(model, calls: set[int], value: float) -> None:
    """Multiply the loss of the given forward calls (0-based) by `value` (NaN or inf): the
    gradients turn non-finite too, as in a real divergence."""
    forward, seen = model.forward, [0]

    def poisoned(batch, task, *args):
        result = forward(batch, task, *args)
        if seen[0] in calls:
            result.losses = {name: loss * value for name, loss in result.losses.items()}
        seen[0] += 1
        return result

    model.forward = poisoned


def train(model, step_batches, dtype: str, zero_stage: int):
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.engine import batch_layout, build_engine
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step

    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", impl="torch",
                        global_batch_size=MICRO * ACCUM)
    layout = batch_layout(optim, MICRO, world_size=1)
    device = torch.device("cpu")
    recipe = uniter_recipe(model, layout, device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # ZeRO-3 reads it in every step
        engine, _ = build_engine(model, optim, ParallelConfig(zero_stage=zero_stage), PrecisionConfig(dtype=dtype),
                                 layout, 10, device)
        loader = ListLoader(b for batches in step_batches for b in batches)
        results = []
        for step in range(len(step_batches)):
            ctx = StepContext(step, 0, device, after_skip=bool(results) and results[-1].skipped)
            results.append(optimizer_step(engine, recipe, loader, "mlm", layout, ctx))
        return results, full_parameters(engine, zero_stage)


def full_parameters(engine, zero_stage: int) -> dict:
    if zero_stage < 3:
        return snapshot(engine.module)
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return snapshot(engine.module)


@pytest.mark.parametrize("dtype,zero_stage", [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3),
                                              ("bf16", 0), ("bf16", 2)])
def test_nonfinite_step_is_skipped_as_if_absent(process_group, steps, tok, dtype, zero_stage):
    model = tiny_uniter(tok)
    # Step 2's second micro-batch (forward call 3) is NaN: no update, Adam state untouched,
    # so step 3 must match a run that never saw step 2.
    poisoned_model = copy.deepcopy(model)
    poison(poisoned_model, {3}, float("nan"))
    with_nan, params_nan = train(poisoned_model, steps, dtype, zero_stage)
    without, params_without = train(copy.deepcopy(model), [steps[0], steps[2]], dtype, zero_stage)
    assert [r.skipped for r in with_nan] == [False, True, False]
    assert [with_nan[0].means["loss"], with_nan[2].means["loss"]] == [r.means["loss"] for r in without]
    for name, p in params_without.items():
        assert torch.equal(params_nan[name], p), name
        assert torch.isfinite(p).all(), name


def test_inf_on_one_micro_batch_skips_too(process_group, steps, tok):
    model = tiny_uniter(tok)
    before = snapshot(model)
    poison(model, {0}, float("inf"))
    results, after = train(model, steps[:1], "fp32", 0)
    assert results[0].skipped
    for name, p in before.items():
        assert torch.equal(after[name], p), name


def nan_run(tmp_path, demo_data, name: str, bad_steps: str, limit: int, nproc: int = 1, bad_rank: str = "all"):
    cfg = write_tiny_config(tmp_path / f"{name}.yaml", demo_data, tmp_path / name,
                            train={"max_consecutive_nonfinite": limit})
    launcher = "torchrun" if nproc > 1 else "python"
    return run_vlpt([bad_rank, bad_steps, "pretrain", "--config", str(cfg)], launcher=launcher, nproc=nproc,
                    check=False, module="tests.inject_nan")


def test_nan_on_one_rank_is_skipped_and_counted_by_both(tmp_path, demo_data):
    proc = nan_run(tmp_path, demo_data, "one_nan", "3", limit=2, nproc=2, bad_rank="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "one_nan" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 1
    assert "step 3: non-finite" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "one_nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "nonfinite_steps" in r] == [3]
    losses = step_losses(tmp_path / "one_nan")
    assert sorted(losses) == [1, 2, 4, 5, 6] and all(np.isfinite(list(losses.values())))  # no NaN logged
    state = json.loads((tmp_path / "one_nan" / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1


def test_consecutive_nan_steps_abort_with_one_line(tmp_path, demo_data):
    proc = nan_run(tmp_path, demo_data, "diverged", "2,3,4,5,6", limit=3)
    assert proc.returncode == 3, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlpt: error: training diverged: the loss was NaN/inf in 3 optimizer steps in a row "
                           "(steps 2-4, train.max_consecutive_nonfinite=3)"), last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "diverged" / "summary.json").exists()
