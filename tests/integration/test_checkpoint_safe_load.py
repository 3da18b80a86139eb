"""Loading a checkpoint never unpickles arbitrary objects: DeepSpeed's files are read with
`weights_only=True` (plus its four plain records), so a resume at ZeRO-1 in bf16 works and a
planted pickle that would run a command is refused with one line, before it runs."""
from __future__ import annotations

import pytest
import torch

from tests.adversarial.conftest import RunsCode
from tests.conftest import run_vlpt, write_tiny_config

pytestmark = pytest.mark.slow


def test_resume_loads_weights_only_and_refuses_a_planted_pickle(tmp_path, demo_data):
    run_dir = tmp_path / "run"

    def run(max_steps: int, check: bool = True):
        cfg = write_tiny_config(tmp_path / f"c{max_steps}.yaml", demo_data, run_dir,
                                parallel={"zero_stage": 1}, precision={"dtype": "bf16"},
                                train={"max_steps": max_steps})
        return run_vlpt(["pretrain", "--config", str(cfg)], check=check)

    run(2)
    resumed = run(3)  # ZeRO-1 optimizer states hold DeepSpeed's loss-scaler / stage records
    assert "resumed from step_00000002 at step 2" in resumed.stderr

    marker = tmp_path / "pwned"
    target = run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt"
    assert target.is_file()
    torch.save({"module": RunsCode(marker)}, target)
    proc = run(4, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlpt: error: {target} holds objects that are not tensors or plain data; "
                           "refusing to unpickle it"), last
    assert "exec" in last  # names the offending global
    assert not marker.exists()
