"""The record every `vlpt bench ...` writes: its figures plus the commit, command and machine."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def tracked_changes() -> Optional[bool]:
    """Whether tracked files differ from the commit (the figures then belong to no commit)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except OSError:
        return None


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def stamp(name: str, figures: dict) -> dict:
    """`figures` with what a reader needs to trust and reproduce them."""
    return {"benchmark": name, "commit": git_commit(), "uncommitted_changes": tracked_changes(),
            "command": " ".join(["vlpt", *sys.argv[1:]]),
            "device": machine(), **figures}


def write_record(record: dict, out: Optional[str]) -> str:
    default = Path("benchmarks/results") / f"{record['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = Path(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return str(path)
