"""ALBEF's learning-rate schedule (`optim.schedule: albef_epochs`, docs/downstream.md, "ALBEF's learning-rate
schedule") against ALBEF's loop stepping a timm cosine scheduler (warmup_prefix), replayed here by hand."""
from __future__ import annotations

import math

import pytest

from trainer.config import OptimConfig
from trainer.engine import lr_lambda


def albef_lrs(lr: float, warmup_lr: float, min_lr: float, warmup_blocks: int, epochs: int, steps: int) -> list[float]:
    """The lr each update of ALBEF's `train()` reads: epoch 0 sets the scheduler's t = i // 100 after updates
    i = 0, 100, ..., 100 W (the scheduler starts at warmup_lr); epoch e >= 1 starts with t = e + W."""
    def timm(t: int) -> float:
        if t < warmup_blocks:
            return warmup_lr + t * (lr - warmup_lr) / warmup_blocks
        t -= warmup_blocks  # warmup_prefix
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))

    current, out = warmup_lr if warmup_blocks else lr, []
    for epoch in range(epochs):
        if epoch > 0:
            current = timm(epoch + warmup_blocks)
        for i in range(steps):
            out.append(current)
            if epoch == 0 and i % 100 == 0 and i <= warmup_blocks * 100:
                current = timm(i // 100)
    return out


@pytest.mark.parametrize("blocks, warmup_lr", [(1, 1e-5), (4, 1e-5), (0, None), (2, 5e-6)])
def test_every_update_reads_albefs_learning_rate(blocks, warmup_lr):
    optim = OptimConfig(lr=2e-5, min_lr=1e-6, schedule="albef_epochs", epoch_steps=450, warmup_steps=100 * blocks,
                        warmup_lr=warmup_lr)
    fn = lr_lambda(optim, total_steps=3 * 450)
    want = albef_lrs(2e-5, warmup_lr or 2e-5, 1e-6, blocks, 3, 450)
    got = [fn(k) * optim.lr for k in range(3 * 450)]
    assert got == pytest.approx(want, rel=1e-12)
    if blocks == 4:  # the warm-up rises in blocks of 100 updates; epoch 1 is already on the cosine
        assert got[0] == got[100] == 1e-5 and got[101] == pytest.approx(1e-5 + 0.25e-5)
        assert got[449] == 2e-5 and got[450] == pytest.approx(1e-6 + 0.5 * 1.9e-5 * (1 + math.cos(math.pi / 3)))


def test_bad_settings_are_refused_with_what_to_set():
    with pytest.raises(ValueError, match="needs optim.epoch_steps"):
        OptimConfig(schedule="albef_epochs")
    with pytest.raises(ValueError, match="blocks of 100 steps: optim.warmup_steps=150"):
        OptimConfig(schedule="albef_epochs", epoch_steps=10, warmup_steps=150)
    with pytest.raises(ValueError, match="not a whole number of optim.epoch_steps=10"):
        lr_lambda(OptimConfig(schedule="albef_epochs", epoch_steps=10, warmup_steps=0), total_steps=25)


def test_a_config_whose_run_is_not_whole_epochs_is_refused_at_load():
    from tests.conftest import REPO
    from trainer.config import load_config

    config = str(REPO / "configs/finetune/albef-base-retrieval-coco.yaml")
    assert load_config(config).optim.schedule == "albef_epochs"
    with pytest.raises(ValueError, match="not a whole number of optim.epoch_steps=2213"):
        load_config(config, ["--train.max_steps=11000"])
