"""`vlpt launch` renders the torchrun / DeepSpeed-launcher command for `vlpt pretrain`."""
import pytest

from cluster.launch import render_command
from trainer.cli import main
from trainer.config_loader import ConfigError

CFG = "configs/pretrain/demo.yaml"


def test_render_local_and_deepspeed():
    local = render_command("local", CFG, 4, ["--optim.lr=1e-4"], master_port=1234)
    assert local[0].endswith("torchrun")
    assert local[1:] == ["--nproc_per_node=4", "--master_port=1234", "-m", "trainer.cli", "pretrain",
                         "--config", CFG, "--optim.lr=1e-4"]
    ds = render_command("deepspeed", CFG, 2)
    assert ds[0].endswith("deepspeed") and ds[1:3] == ["--num_gpus", "2"]
    assert ds[-4:] == ["trainer.cli", "pretrain", "--config", CFG]


@pytest.mark.parametrize("args,needle", [(("slurm", CFG, 2), "slurm"), (("local", CFG, 0), "--nproc"),
                                         (("local", "nope.yaml", 2), "nope.yaml")])
def test_render_errors(args, needle):
    with pytest.raises(ConfigError, match=needle):
        render_command(*args)


def test_cli_dry_run_prints_command(capsys):
    assert main(["launch", "local", "--config", CFG, "--nproc", "2", "--dry-run", "--train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=2" in out and "--train.max_steps=5" in out
