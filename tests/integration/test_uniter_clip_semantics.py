"""`optim.accum_sum_semantics: true` reproduces UNITER's summed-gradient optimizer step.

UNITER's step over k micro-batches: backward of each micro-batch's MEAN loss, gradients
SUMMED over the k micro-steps (no division by k), `clip_grad_norm_(params, grad_norm)` on
that sum, then AdamW (betas (0.9, 0.98), eps 1e-6, weight decay 0.01 except biases and
LayerNorms). Our step (DeepSpeed engine + `trainer.step.optimizer_step`) takes the gradient of
the step's global mean, k times smaller when the micro-batches have equal term counts;
`accum_sum_semantics` divides the clip and Adam's eps by k, which must give UNITER's updates.

The reference below is plain torch, written from UNITER's pretrain loop; the run under test
is the real engine from `trainer.engine.build_engine` on a 1-process gloo group. The same MLM
micro-batches (equal masked-token counts within a step, so UNITER's mean of micro-batch
means equals our global mean) feed both. Dropout is off.

Each regime also runs with `accum_sum_semantics: false`:
  * clip: grad_norm between |g_UNITER| / k and |g_UNITER|, so UNITER clips on every step and
    the unscaled clip on our k-times-smaller gradient never does: the runs differ;
  * eps:  no clipping, Adam eps large enough to matter, so only the eps scaling differs;
  * tiny-clip: grad_norm far below both gradients' norms: both conventions clip to the same
    gradient, so false matches too (a small grad_norm alone does not exercise the setting).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.engine_util import ListLoader, demo_region_samples, snapshot, tiny_uniter, uniter_recipe
from trainer.recipes import uniter_tasks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

K = 3  # micro-batches per optimizer step (grad_accum); not a power of 2, so the 1/K scalings round
STEPS = 3
MICRO = 6  # samples per micro-batch
LR = 1e-3
WEIGHT_DECAY = 0.01
MATCH_RTOL, MATCH_ATOL = 1e-6, 5e-7  # ours vs UNITER, per parameter element; the atol covers
# fp32 rounding of near-zero weights (multi-tensor vs per-tensor AdamW) and is ~2e-4 of the
# 3-step update (~3 x LR per element)
MATCH_UPDATE = 1e-5  # ours vs UNITER: |update difference| / |update| over all parameters
DIFFER = 1e-3  # relative difference of the updates without accum_sum_semantics, at least


@pytest.fixture(scope="module")
def step_batches(demo_data, tok):
    """STEPS lists of K MLM micro-batches; within a step all have the same masked-token count."""
    from data.collate import collate_mlm

    samples = demo_region_samples(demo_data, tok, STEPS * K * MICRO)
    steps = []
    for s in range(STEPS):
        batches, target = [], None
        for i in range(K):
            chunk = samples[(s * K + i) * MICRO:(s * K + i + 1) * MICRO]
            for seed in range(1000):  # the first masking with the step's term count
                batch = collate_mlm(chunk, np.random.default_rng([s, i, seed]), tok, mlm_prob=0.15)
                if target is None or batch["n_items"] == target:
                    break
            else:
                raise AssertionError(f"no masking of step {s} micro-batch {i} with {target} terms")
            target = batch["n_items"]
            batches.append(batch)
        steps.append(batches)
    assert len({b["n_items"] for b in steps[0]}) == 1
    return steps


@pytest.fixture(scope="module")
def base_model(tok):
    return tiny_uniter(tok)


# ---------------------------------------------------------------- UNITER's step, in plain torch

def uniter_param_groups(model, weight_decay):
    """UNITER's optim/misc.py rule: no decay where the name contains 'bias', 'LayerNorm.bias' or
    'LayerNorm.weight' (case-sensitive, so `img_layer_norm.weight` is decayed)."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)],
             "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]


def uniter_reference(model, steps, grad_norm, eps):
    """Returns the parameters after the steps and the pre-clip norm of each summed gradient."""
    model.train()
    opt = torch.optim.AdamW(uniter_param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.98), eps=eps)
    norms = []
    for batches in steps:
        opt.zero_grad(set_to_none=True)
        for batch in batches:
            result = model(batch, uniter_tasks.mlm)
            (result.losses["loss"] / batch["n_items"]).backward()  # the micro-batch mean; grads add up
        # Parameters this task does not reach (MRM's mask embedding, the ITM / region heads)
        # get a zero gradient, as in UNITER once every task has run (its optimizer.zero_grad()
        # zeroes, not frees, gradients) and as under DeepSpeed: AdamW then still decays them.
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        params = list(model.parameters())
        if grad_norm > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, grad_norm)))
        else:
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        opt.step()
    return snapshot(model), norms


# ---------------------------------------------------------------- ours: DeepSpeed + optimizer_step

def ours(process_group, model, steps, grad_clip, eps, accum_sum):
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.engine import accum_sum_factor, batch_layout, build_engine
    from trainer.recipes.base import StepContext
    from trainer.step import optimizer_step

    optim = OptimConfig(lr=LR, betas=(0.9, 0.98), eps=eps, weight_decay=WEIGHT_DECAY, impl="torch",
                        schedule="constant", warmup_steps=0, grad_clip=grad_clip,
                        accum_sum_semantics=accum_sum, global_batch_size=MICRO * K)
    layout = batch_layout(optim, MICRO, world_size=1)
    assert (layout.grad_accum, layout.world_size) == (K, 1)
    device = torch.device("cpu")
    recipe = uniter_recipe(model, layout, device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # DeepSpeedEngine asserts it is set, as a launcher would
        engine, ds_config = build_engine(model, optim, ParallelConfig(), PrecisionConfig(), layout,
                                         STEPS, device)
    factor = K if accum_sum else 1
    assert accum_sum_factor(optim, layout) == factor
    assert ds_config["gradient_clipping"] == pytest.approx(grad_clip / factor)
    assert engine.optimizer.param_groups[0]["eps"] == pytest.approx(eps / factor)
    loader = ListLoader(b for batches in steps for b in batches)
    for step in range(len(steps)):
        stats = optimizer_step(engine, recipe, loader, "mlm", layout, StepContext(step, 0, device)).means
        assert np.isfinite(stats["loss"])
    assert loader.batches == [] and engine.global_steps == STEPS
    return snapshot(engine.module)


def update_error(got, ref, start):
    """|(got - start) - (ref - start)| / |ref - start| over all parameters."""
    num = sum(float(((got[n] - ref[n]) ** 2).sum()) for n in ref)
    den = sum(float(((ref[n] - start[n]) ** 2).sum()) for n in ref)
    return (num / den) ** 0.5


def initial_summed_grad_norm(model, batches):
    model = copy.deepcopy(model)
    for batch in batches:
        result = model(batch, uniter_tasks.mlm)
        (result.losses["loss"] / batch["n_items"]).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                        if p.grad is not None])))


@pytest.mark.parametrize("regime", ["clip", "eps", "tiny-clip"])
def test_accum_sum_semantics_reproduces_uniter_step(process_group, base_model, step_batches, regime):
    start = snapshot(base_model)
    g0 = initial_summed_grad_norm(base_model, step_batches[0])
    if regime == "clip":
        # UNITER's clip is active (|g| > grad_norm) while |g| / K stays below it.
        grad_norm, eps = 0.5 * g0, 1e-6
    elif regime == "eps":
        grad_norm, eps = 0.0, 1e-4
    else:
        # Both clips active: the clipped gradient has norm grad_norm whatever its scale.
        grad_norm, eps = 0.05, 1e-6

    ref, norms = uniter_reference(copy.deepcopy(base_model), step_batches, grad_norm, eps)
    if grad_norm:
        assert all(n > grad_norm for n in norms), (norms, grad_norm)  # UNITER clipped every step
    if regime == "clip":
        assert all(n / K < grad_norm for n in norms), (norms, grad_norm)  # an unscaled clip never would
    if regime == "tiny-clip":
        assert all(n / K > grad_norm for n in norms), (norms, grad_norm)  # an unscaled one would too
    assert max(float((ref[n] - start[n]).abs().max()) for n in ref) > 0.5 * LR  # the steps moved the weights

    got = ours(process_group, copy.deepcopy(base_model), step_batches, grad_norm, eps, accum_sum=True)
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=MATCH_RTOL, atol=MATCH_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert update_error(got, ref, start) < MATCH_UPDATE

    plain = ours(process_group, copy.deepcopy(base_model), step_batches, grad_norm, eps, accum_sum=False)
    if regime == "tiny-clip":
        # Where both clip on every step, the setting changes nothing (at eps << |grad| entries):
        # a small grad_norm alone cannot tell the conventions apart.
        assert update_error(plain, ref, start) < MATCH_UPDATE
    else:
        assert update_error(plain, ref, start) > DIFFER, "accum_sum_semantics made no difference"
