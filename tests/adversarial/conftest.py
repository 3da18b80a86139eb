"""Helpers of the adversarial corpus: every attack is built on the fly from tiny files,
and every test checks that nothing outside the run dir was created, changed or removed."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


def tree_listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `root` (links not followed): relative path -> (kind, size, mtime_ns)."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = (kind, 0 if kind == "dir" else st.st_size,
                                             0 if kind == "dir" else st.st_mtime_ns)
    return out


@pytest.fixture
def outside_guard(tmp_path):
    """Yields (parent, run_dir): `parent` holds the run dir and a `victim/` folder with a
    file; after the test every entry of `parent` outside `run_dir` must be as it was."""
    parent = tmp_path / "outside"
    victim = parent / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("do not touch\n")
    run_dir = parent / "run"
    before = {k: v for k, v in tree_listing(parent).items() if not (k == "run" or k.startswith("run/"))}
    yield parent, run_dir
    after = {k: v for k, v in tree_listing(parent).items() if not (k == "run" or k.startswith("run/"))}
    assert after == before, f"entries outside the run dir changed: {sorted(set(after) ^ set(before))}"


class RunsCode:
    """A pickle that, when unpickled, runs code creating `marker`: what a planted checkpoint
    file would do. Every test asserts the marker was never created."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def own_peak_rss_kb() -> int:
    """This process's peak resident memory since it was started (VmHWM, in KB). Not
    `ru_maxrss`: Linux carries the forking parent's high-water mark over into a child's, so a
    subprocess started by a large pytest process would report the parent's peak."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))
