"""Acceptance (issue 6): gradient accumulation 4 x micro equals one 4x batch (rtol 1e-5), and
activation checkpointing on equals off (rtol 1e-6), on the real engine (1-process gloo group)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.engine_util import ListLoader, demo_region_samples, snapshot, tiny_uniter, uniter_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
STEPS, MICRO, K = 3, 8, 4


@pytest.fixture(scope="module")
def samples(demo_data, tok):
    return demo_region_samples(demo_data, tok, STEPS * MICRO * K)


def mlm_steps(samples, tok, micro):
    """STEPS lists of MLM batches of `micro` samples. Masking draws per sample, in order, from one
    generator per step, so 4 batches of 8 carry exactly the masks of the one batch of 32."""
    from data.collate import collate_mlm

    steps = []
    for s in range(STEPS):
        rng = np.random.default_rng(s)
        chunk = samples[s * MICRO * K:(s + 1) * MICRO * K]
        steps.append([collate_mlm(chunk[i:i + micro], rng, tok) for i in range(0, len(chunk), micro)])
    return steps


def train(model, steps, micro):
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.engine import batch_layout, build_engine
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step

    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", impl="torch", global_batch_size=MICRO * K)
    layout = batch_layout(optim, micro, world_size=1)
    device = torch.device("cpu")
    recipe = uniter_recipe(model, layout, device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        engine, _ = build_engine(model, optim, ParallelConfig(), PrecisionConfig(), layout, STEPS, device)
    loader = ListLoader(b for batches in steps for b in batches)
    torch.manual_seed(1)  # the dropout stream
    losses = [optimizer_step(engine, recipe, loader, "mlm", layout, StepContext(step, 0, device)).means["loss"]
              for step in range(len(steps))]
    assert loader.batches == [] and engine.global_steps == STEPS
    return losses, snapshot(engine.module)


def assert_params_close(a, b, rtol, atol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_accumulating_4_micro_batches_equals_one_4x_batch(process_group, samples, tok):
    micro_steps, big_steps = mlm_steps(samples, tok, MICRO), mlm_steps(samples, tok, MICRO * K)
    for micro, (big,) in zip(micro_steps, big_steps):
        assert torch.equal(torch.cat([b["mlm_targets"] for b in micro]), big["mlm_targets"])
    model = tiny_uniter(tok, dropout=0.0, checkpointing=False)
    accumulated, p_acc = train(copy.deepcopy(model), micro_steps, MICRO)
    single, p_single = train(copy.deepcopy(model), big_steps, MICRO * K)
    assert accumulated == pytest.approx(single, rel=1e-5, abs=0)
    assert_params_close(p_acc, p_single, rtol=1e-5, atol=1e-7)
    assert accumulated[0] != accumulated[-1]  # the steps did train


def test_activation_checkpointing_on_equals_off(process_group, samples, tok):
    """Dropout on: recomputing a layer in backward must replay the forward's dropout masks."""
    steps = mlm_steps(samples, tok, MICRO)
    off, p_off = train(tiny_uniter(tok, dropout=0.1, checkpointing=False), steps, MICRO)
    on, p_on = train(tiny_uniter(tok, dropout=0.1, checkpointing=True), steps, MICRO)
    assert on == pytest.approx(off, rel=1e-6, abs=0)
    assert_params_close(p_on, p_off, rtol=1e-6, atol=1e-8)
