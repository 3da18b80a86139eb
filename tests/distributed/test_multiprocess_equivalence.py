"""Acceptance: 2 CPU processes (gloo) give the losses of 1 process at the same global batch.

1 process: micro 8 x accumulation 2; 2 processes: micro 8 x 1 each. The data streams
make the global batch identical; the loss is normalised by the step's global term count.
Dropout is off: its masks are per-process randomness no layout can share.
"""
import pytest

from tests.conftest import run_vlpt, step_losses, write_tiny_config

pytestmark = pytest.mark.slow
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def config(tmp_path, demo_data, name, zero_stage):
    return write_tiny_config(tmp_path / f"{name}.yaml", demo_data, tmp_path / name,
                             model=NO_DROPOUT, optim={"global_batch_size": 16},
                             parallel={"zero_stage": zero_stage}, train={"max_steps": 5})


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("single")
    run_vlpt(["pretrain", "--config", str(config(tmp, demo_data, "one", 0))])
    return step_losses(tmp / "one")


def assert_same(ref, got):
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, ref, got)


def test_deepspeed_launcher_zero2_two_processes(tmp_path, demo_data, single_process):
    run_vlpt(["pretrain", "--config", str(config(tmp_path, demo_data, "ds", 2))],
             launcher="deepspeed", nproc=2)
    assert_same(single_process, step_losses(tmp_path / "ds"))


def test_torchrun_two_processes(tmp_path, demo_data, single_process):
    run_vlpt(["pretrain", "--config", str(config(tmp_path, demo_data, "tr", 1))],
             launcher="torchrun", nproc=2)
    assert_same(single_process, step_losses(tmp_path / "tr"))
