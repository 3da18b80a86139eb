"""A pickle planted in any checkpoint file never runs: not on `vlpt convert export` (ZeRO-0
model states, ZeRO-2 model and optimizer states, through DeepSpeed's consolidation too) and
not on resume (model / optimizer states, rng_rank0.pt, teacher.pt). Each is refused with
one line naming the file and the offending global."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.adversarial.conftest import RunsCode
from tests.conftest import REPO, run_vlpt, write_tiny_config
from trainer import checkpoint as ckpt
from trainer.checkpoint_files import UnsafeCheckpointError, deepspeed_records
from trainer.config import Config, config_to_yaml
from trainer.distributed import DistInfo
from trainer.models.config import ModelConfig
from trainer.models.pretrain import UniterForPretraining
from vlpt.cli import main

TINY = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   vocab_size=50, img_dim=16, img_label_dim=9)
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def plant(file: Path, marker: Path) -> None:
    """Add a payload to a real checkpoint file, keeping everything else it held."""
    with torch.serialization.safe_globals(deepspeed_records()):
        obj = torch.load(file, map_location="cpu", weights_only=True)
    obj["planted"] = RunsCode(marker)
    torch.save(obj, file)


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def saved_run(request, process_group, tmp_path_factory):
    """(engine, run dir, teacher) with one checkpoint written by our save_checkpoint at the
    given ZeRO stage after one optimizer step; `teacher` stands in for ALBEF's replicated module."""
    deepspeed, stage = process_group, request.param
    torch.manual_seed(0)
    model = UniterForPretraining(TINY)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine.backward(sum((p ** 2).sum() for p in engine.module.parameters()))
    engine.step()
    run_dir = tmp_path_factory.mktemp(f"run_zero{stage}")
    teacher = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(engine, str(run_dir), 1, {"step": 1, "positions": {}, "task_counts": {}},
                         config_to_yaml(Config(model=TINY)), 3, ONE, {"teacher": teacher})
    return engine, run_dir, teacher


def kinds(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / "step_00000001").glob("*.pt"))


def planted_copy(run_dir: Path, tmp_path: Path, kind: str) -> tuple[Path, Path, Path]:
    """(copy of the run dir, its file `kind` with a payload planted, the marker the payload
    would create); skips where the stage writes no such file (ZeRO-0: no optimizer partition)."""
    if kind not in kinds(run_dir):
        pytest.skip(f"ZeRO stage of this checkpoint writes no {kind}")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    target = copy / "checkpoints" / "step_00000001" / kind
    marker = tmp_path / "pwned"
    plant(target, marker)
    return copy, target, marker


def test_the_checkpoints_hold_the_files_of_their_stage(saved_run):
    engine, run_dir, _ = saved_run
    names = kinds(run_dir)
    assert {"mp_rank_00_model_states.pt", "rng_rank0.pt", "teacher.pt"} <= set(names)
    assert ("zero_pp_rank_0_mp_rank_00_optim_states.pt" in names) == (engine.zero_optimization_stage() > 0)


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_export_refuses_a_planted_pickle(saved_run, tmp_path, capsys, kind):
    copy, target, marker = planted_copy(saved_run[1], tmp_path, kind)

    assert main(["convert", "export", "--src", str(copy), "--dst", str(tmp_path / "out.pt")]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"vlpt: error: {target} holds objects that are not tensors or plain data; "
                             "refusing to unpickle it"), err[0]
    assert "GLOBAL exec" in err[0]
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "rng_rank0.pt", "teacher.pt"])
def test_resume_refuses_a_planted_pickle(saved_run, tmp_path, kind):
    engine, run_dir, teacher = saved_run
    copy, target, marker = planted_copy(run_dir, tmp_path, kind)

    with pytest.raises(UnsafeCheckpointError) as err:
        ckpt.load_newest_usable(engine, str(copy), ONE, {"teacher": teacher})
    assert str(err.value).startswith(f"{target} holds objects that are not tensors or plain data")
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.slow
def test_pretrain_refuses_a_planted_rng_file_with_one_line(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir, train={"max_steps": 2})
    run_vlpt(["pretrain", "--config", str(cfg)])
    target = run_dir / "checkpoints" / "step_00000002" / "rng_rank0.pt"
    marker = tmp_path / "pwned"
    plant(target, marker)

    proc = run_vlpt(["pretrain", "--config", str(cfg), "--train.max_steps=3"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlpt: error: {target} holds objects"), last
    assert not marker.exists()


def test_no_load_without_weights_only_in_the_project():
    found = subprocess.run(["grep", "-rn", "--include=*.py", "weights_only=False",
                            "trainer", "data", "kernels", "cluster", "vlpt"], cwd=REPO, capture_output=True, text=True)
    assert found.stdout == "", found.stdout
