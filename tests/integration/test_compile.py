"""`train.compile` (trainer/compile.py): each transformer block compiled in place, in-process on the real
engine (1-process gloo group) with the run's own model, loaders and optimizer step (fp32, no dropout):

- UNITER and ALBEF (student and teacher) give the eager losses (rtol 1e-5) at ZeRO-0 and ZeRO-2;
- UNITER's token-budget batches of many [B, L] compile one graph in 12 steps (dynamic shapes);
- activation checkpointing recomputes compiled layers with the forward's dropout masks;
- parameter names and state-dict keys are the eager model's.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import NO_DROPOUT, write_albef_config, write_tiny_config

pytestmark = pytest.mark.usefixtures("one_thread", "process_group")
COMPILES = pytest.mark.slow  # 30-50 s each with a cold inductor cache on 2 CPU cores, 5-15 s warm
UNITER_STEPS, ALBEF_STEPS = 12, 3
BUDGET = {"uniter": {"token_budget": 300}}
"""The demo rows are 17-22 tokens long: batches of 16 rows up to 18 tokens, else of 8."""


def train(cfg_path, steps: int, *overrides: str) -> list[dict[str, float]]:
    """Step means of `steps` optimizer steps of the engine Run.build makes (compiled when the config
    says so), on the run's own training loaders."""
    from data.tokenizer import tokenizer_from_config
    from trainer.config import load_config
    from trainer.distributed import DistInfo
    from trainer.recipes import recipe_class
    from trainer.recipes.base import StepContext
    from trainer.run import Run
    from trainer.run_setup import build_train_loaders
    from trainer.step import optimizer_step
    from trainer.task_mix import draw_task, mix_ratios, task_of

    cfg = load_config(str(cfg_path), list(overrides))
    recipe = recipe_class(cfg.model.arch)(cfg)
    tok = tokenizer_from_config(cfg.data.tokenizer)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        run = Run.build(cfg, recipe, info, tok, config_yaml="")
    loaders = build_train_loaders(cfg, recipe, tok, run.layout, rank=0, positions={})
    recipe.on_loaders(loaders, run.layout)
    ratios, means = mix_ratios(cfg), []
    torch.manual_seed(1)  # the dropout stream
    for step in range(steps):
        key = draw_task(cfg.train.seed, step, ratios)
        ctx = StepContext(step, cfg.train.seed, info.device)
        means.append(optimizer_step(run.engine, recipe, loaders[key], task_of(key), run.layout, ctx).means)
    return means


def fresh_compiler() -> None:
    """Compiled code and counters are per process: start each count from none."""
    torch._dynamo.reset()
    counters.clear()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_same_losses(eager: list[dict], compiled: list[dict], rel: float) -> None:
    assert len(compiled) == len(eager)
    for step, (e, c) in enumerate(zip(eager, compiled)):
        assert c.keys() == e.keys(), step
        for name in e:
            assert c[name] == pytest.approx(e[name], rel=rel, abs=1e-7), (step, name)


@pytest.fixture
def uniter_config(tmp_path, demo_data):
    return write_tiny_config(tmp_path / "uniter.yaml", demo_data, tmp_path / "uniter", model=NO_DROPOUT,
                             data=BUDGET, optim={"warmup_steps": 0})


@COMPILES
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_uniter_compiled_layers_train_as_eager_with_one_graph_for_every_batch_shape(uniter_config, zero_stage):
    zero = f"--parallel.zero_stage={zero_stage}"
    eager = train(uniter_config, UNITER_STEPS, zero)
    fresh_compiler()
    compiled = train(uniter_config, UNITER_STEPS, zero, "--train.compile=true")
    assert_same_losses(eager, compiled, rel=1e-5)
    assert eager[0]["loss"] != eager[-1]["loss"]
    # Rows of 17-22 tokens in batches of 8 and 16, MLM and ITM (+WRA): one graph serves them all
    # (without dynamic=True: 3, for the first shape, the first new L and the first new B).
    assert compiled_graphs() == 1


@COMPILES
def test_activation_checkpointing_recomputes_compiled_layers_with_the_same_dropout(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "ac.yaml", demo_data, tmp_path / "ac", data=BUDGET,
                            model={"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    fresh_compiler()
    plain = train(cfg, 4, "--train.compile=true")
    recomputed = train(cfg, 4, "--train.compile=true", "--model.activation_checkpointing=true")
    assert_same_losses(plain, recomputed, rel=1e-6)
    assert compiled_graphs() == 1  # the recompute runs the forward's graph again


@COMPILES
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_albef_compiled_student_and_teacher_train_as_eager(tmp_path, pixel_data, zero_stage):
    cfg = write_albef_config(tmp_path, pixel_data, "albef", ALBEF_STEPS, parallel={"zero_stage": zero_stage})
    eager = train(cfg, ALBEF_STEPS)
    fresh_compiler()
    compiled = train(cfg, ALBEF_STEPS, "--train.compile=true")
    assert_same_losses(eager, compiled, rel=1e-5)
    # ViT, text and fusion blocks, each once with gradients (student) and once without (teacher).
    assert compiled_graphs() == 6


@pytest.mark.parametrize("arch", ["uniter", "albef"])
def test_compiling_keeps_the_parameter_names_and_state_dict_keys(tmp_path, demo_data, pixel_data, arch, caplog):
    from trainer.compile import compile_regions
    from trainer.config import load_config
    from trainer.engine import batch_layout
    from trainer.recipes import recipe_class

    path = (write_tiny_config(tmp_path / "u.yaml", demo_data, tmp_path / "u") if arch == "uniter"
            else write_albef_config(tmp_path, pixel_data, "a", 1))
    cfg = load_config(str(path))
    recipe = recipe_class(arch)(cfg)
    model = recipe.build_model()
    recipe.attach(model, batch_layout(cfg.optim, cfg.data.micro_batch_size, 1), torch.device("cpu"))
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    held = {name: list(m.state_dict()) for name, m in recipe.replicated().items()}
    with caplog.at_level(logging.INFO, logger="trainer.compile"):
        counts = compile_regions(model, recipe)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    assert {name: list(m.state_dict()) for name, m in recipe.replicated().items()} == held
    blocks = [b for group in recipe.blocks_to_compile(model).values() for b in group]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    expected = ({"encoder layers": 2} if arch == "uniter" else
                {"ViT blocks": 2, "text layers": 1, "fusion layers": 1, "teacher blocks": 4})
    assert counts == expected
    if arch == "uniter":
        assert "torch.compile: 2 encoder layers (dynamic shapes)" in caplog.messages


def test_a_family_that_names_no_blocks_refuses_train_compile():
    from torch import nn

    from trainer.compile import compile_regions
    from trainer.config import Config
    from trainer.config_files import ConfigError
    from trainer.recipes.base import Recipe

    class Blockless(Recipe):
        arch = "blockless"

    with pytest.raises(ConfigError, match="model.arch='blockless' names no blocks to compile.*train.compile=false"):
        compile_regions(nn.Linear(2, 2), Blockless(Config()))
