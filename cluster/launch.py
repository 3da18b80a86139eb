"""Render (and optionally run) the command that starts a multi-process run on this machine.

`local` uses torchrun, `deepspeed` the DeepSpeed launcher; both start
`python -m trainer.cli pretrain --config ... <overrides>` once per process.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from trainer.config_loader import ConfigError

LAUNCHERS = ("local", "deepspeed")


def render_command(launcher: str, config: str, nproc: int, overrides: list[str] = (),
                   master_port: int = 29500) -> list[str]:
    """argv of the launch; `overrides` are dotted `--section.key=value` strings."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if not Path(config).is_file():
        raise ConfigError(f"config file not found: {config}")
    bin_dir = Path(sys.executable).parent
    program = ["pretrain", "--config", config, *overrides]
    if launcher == "local":
        return [str(bin_dir / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={master_port}",
                "-m", "trainer.cli", *program]
    return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(master_port),
            "--module", "trainer.cli", *program]


def launch(launcher: str, config: str, nproc: int, overrides: list[str], dry_run: bool,
           master_port: int = 29500) -> int:
    argv = render_command(launcher, config, nproc, overrides, master_port)
    print(shlex.join(argv), flush=True)
    if dry_run:
        return 0
    return subprocess.run(argv).returncode
