"""A damaged newest checkpoint (a file cut in half, a missing rank file, an unreadable
trainer_state.json) costs one warning line and the run resumes from the previous complete
one; with none usable, one error line and exit 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_vlpt, write_tiny_config
from trainer import checkpoint as ckpt
from trainer.checkpoint_files import STATE_FILE
from trainer.config import Config, config_to_yaml
from trainer.distributed import DistInfo
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining

TINY = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   vocab_size=50, img_dim=16, img_label_dim=9)
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OLD, NEW = "step_00000001", "step_00000002"


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "model_states_cut_in_half": lambda tag: truncate(tag / "mp_rank_00_model_states.pt"),
    "optim_states_cut_in_half": lambda tag: truncate(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "model_states_missing": lambda tag: (tag / "mp_rank_00_model_states.pt").unlink(),
    "optim_states_missing": lambda tag: (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
    "rng_cut_in_half": lambda tag: truncate(tag / "rng_rank0.pt"),
    "trainer_state_unreadable": lambda tag: (tag / STATE_FILE).write_text('{"step": 2, "posi'),
}


@pytest.fixture(scope="module")
def two_checkpoints(process_group, tmp_path_factory):
    """(engine, run dir) with checkpoints at steps 1 and 2 (ZeRO-1: model and optimizer files)."""
    torch.manual_seed(0)
    model = UniterForPretraining(TINY)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        engine, *_ = process_group.initialize(model=model, config=config,
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    run_dir = tmp_path_factory.mktemp("run")
    for step in (1, 2):
        engine.backward(sum((p ** 2).sum() for p in engine.module.parameters()))
        engine.step()
        ckpt.save_checkpoint(engine, str(run_dir), step, {"step": step, "positions": {}, "task_counts": {}},
                             config_to_yaml(Config(model=TINY)), 3, ONE)
    return engine, run_dir


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(two_checkpoints, tmp_path, caplog, damage):
    engine, run_dir = two_checkpoints
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    DAMAGE[damage](copy / "checkpoints" / NEW)

    tag, saved, rng = ckpt.load_newest_usable(engine, str(copy), ONE)

    assert (tag, saved["step"]) == (OLD, 1) and rng is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and NEW in r.getMessage()]
    assert len(warnings) == 1 and len(warnings[0].splitlines()) == 1, warnings
    assert warnings[0].startswith(f"checkpoint {NEW} is not usable ("), warnings[0]


def test_none_usable_is_one_error_line(two_checkpoints, tmp_path):
    engine, run_dir = two_checkpoints
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for tag in (OLD, NEW):
        truncate(copy / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError) as err:
        ckpt.load_newest_usable(engine, str(copy), ONE)
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith(f"no usable checkpoint in {copy / 'checkpoints'}: {NEW}: ")


def test_keep_last_default_keeps_a_fallback():
    assert Config().train.keep_last >= 2


@pytest.mark.slow
def test_pretrain_resumes_from_the_previous_checkpoint(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 4, "save_every": 2})
    run_vlpt(["pretrain", "--config", str(cfg)])
    root = run_dir / "checkpoints"
    truncate(root / "step_00000004" / "mp_rank_00_model_states.pt")

    proc = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=5"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "step_00000004 is not usable" in ln]
    assert len(warned) == 1 and "mp_rank_00_model_states.pt" in warned[0], proc.stderr[-3000:]
    assert "resumed from step_00000002 at step 2" in proc.stderr

    for tag in ("step_00000002", "step_00000005"):
        truncate(root / tag / "mp_rank_00_model_states.pt")
    truncate(root / "step_00000004" / STATE_FILE)
    proc = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=6"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlpt: error: no usable checkpoint in {root}: step_00000005: "), last
