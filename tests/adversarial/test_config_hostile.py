"""Hostile run configs: non-finite numbers, absurd step counts, YAML alias bombs, recursive
anchors, deep nesting and include bombs. Each is refused by `vlpt config` / `vlpt pretrain`
with exit 2 and exactly one stderr line naming the key (or file), no traceback, in seconds."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env, write_tiny_config

DEMO = str(REPO / "configs/pretrain/demo.yaml")


def vlpt(*args: str, timeout: float = 20) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vlpt", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one line on stderr (containing every needle), no traceback; returns the line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("vlpt: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- non-finite numbers, step bounds

@pytest.mark.parametrize("override,key", [
    ("--optim.lr=.nan", "optim.lr"),
    ("--optim.lr=nan", "optim.lr"),            # a string that float() would read as NaN
    ("--tasks.itm=.inf", "tasks.itm"),
    ("--tasks.itm=.nan", "tasks.itm"),         # used to drop ITM from the mix silently
    ("--optim.betas=[0.9,.nan]", "optim.betas[1]"),
    ("--data.mlm_prob=-.inf", "data.mlm_prob"),
    ("--train.max_steps=1.0e+29", "train.max_steps"),
    ("--train.max_steps=100000000000000000000000000000", "train.max_steps"),
    ("--train.save_every=2000000000", "train.save_every"),
    ("--train.val_every=2000000000", "train.val_every"),
    ("--train.log_every=2000000000", "train.log_every"),
    ("--optim.warmup_steps=2000000000", "optim.warmup_steps"),
    ("--optim.total_steps=2000000000", "optim.total_steps"),
    ("--train.seed=100000000000000000000000", "train.seed"),  # beyond int64
])
def test_bad_number_override_is_one_line(override, key):
    proc, _ = vlpt("config", "--config", DEMO, override)
    assert_refused(proc, key)


def test_non_finite_in_file_anywhere_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {DEMO}\ndata:\n  datasets:\n    - {{name: a, train: x, tasks: {{mlm: .inf}}}}\n")
    proc, _ = vlpt("config", "--config", str(bad))
    assert_refused(proc, "data.datasets[0].tasks.mlm")
    bad.write_text(f"include: {DEMO}\nlol: [1, 2, .nan]\n")  # under an unknown key: that error first
    proc, _ = vlpt("config", "--config", str(bad))
    assert_refused(proc, "unknown config key 'lol'")


def test_pretrain_refuses_nan_lr_before_touching_anything(tmp_path, demo_data, outside_guard):
    _, run_dir = outside_guard
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, run_dir)
    proc, _ = vlpt("pretrain", "--config", str(cfg), "--optim.lr=.nan")
    assert_refused(proc, "optim.lr")
    assert not run_dir.exists()


# ---------------------------------------------------------------- alias bombs, nesting, includes

def billion_laughs(top_key: str, mappings: bool = False) -> str:
    """9 levels of 9 aliases each: 9**9 (387 million) leaves once expanded, ~500 bytes on disk."""
    if mappings:
        lines = ['a: &a {x0: "lol", x1: "lol", x2: "lol"}']
        for prev, cur in zip("abcdefgh", "bcdefghi"):
            lines.append(f"{cur}: &{cur} {{" + ", ".join(f"k{i}: *{prev}" for i in range(9)) + "}")
        return f"{top_key}:\n" + "\n".join("  " + line for line in lines) + "\n"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return f"{top_key}:\n" + "\n".join("  " + line for line in lines) + "\n"


@pytest.mark.parametrize("top_key,mappings", [("lol", False), ("tasks", False), ("data", True)])
def test_alias_bomb_is_refused_quickly(tmp_path, top_key, mappings):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(top_key, mappings))
    assert bomb.stat().st_size < 700
    proc, seconds = vlpt("config", "--config", str(bomb), timeout=20)
    assert_refused(proc, "bomb.yaml", top_key)
    assert seconds < 5, seconds


def test_alias_bomb_in_an_override_is_refused_quickly():
    value = "{" + ", ".join(f"k{i}: &a{i} [" + ",".join([f"*a{i - 1}" if i else '"lol"'] * 9) + "]"
                            for i in range(9)) + "}"
    proc, seconds = vlpt("config", "--config", DEMO, f"--storage.s3={value}", timeout=20)
    assert_refused(proc, "--storage.s3")
    assert seconds < 5, seconds


@pytest.mark.parametrize("text,needle", [
    ("tasks: &a [*a]\n", "recursive"),                              # a list that contains itself
    ("storage: &s {s3: *s}\n", "recursive"),
    ("tasks: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),         # the YAML composer recurses per level
    ("tasks: " + "{a: " * 200 + "1" + "}" * 200 + "\n", "nested"),  # under the composer's limit, over ours
])
def test_recursive_or_deep_yaml_is_one_line(tmp_path, text, needle):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    proc, seconds = vlpt("config", "--config", str(path))
    assert_refused(proc, "deep.yaml", needle)
    assert seconds < 5, seconds


def test_include_bomb_and_include_depth_are_bounded(tmp_path):
    # Each file includes the next one twice: 2**30 loads without a bound on included files.
    for i in range(30):
        (tmp_path / f"inc{i}.yaml").write_text(f"include: [inc{i + 1}.yaml, inc{i + 1}.yaml]\n")
    (tmp_path / "inc30.yaml").write_text("train: {max_steps: 5}\n")
    proc, seconds = vlpt("config", "--config", str(tmp_path / "inc0.yaml"))
    assert_refused(proc, "include")
    assert seconds < 5, seconds
    # A chain of distinct files, one include each, deeper than the bound.
    for i in range(40):
        (tmp_path / f"chain{i}.yaml").write_text(f"include: chain{i + 1}.yaml\n")
    (tmp_path / "chain40.yaml").write_text("train: {max_steps: 5}\n")
    proc, _ = vlpt("config", "--config", str(tmp_path / "chain0.yaml"))
    assert_refused(proc, "include", "deep")


def test_huge_config_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "w") as f:
        f.write("train: {max_steps: 5}\n# " + "x" * (5 << 20) + "\n")
    proc, seconds = vlpt("config", "--config", str(path))
    assert_refused(proc, "huge.yaml", "MiB")
    assert seconds < 5, seconds


def test_sane_configs_still_load(tmp_path):
    """The bounds leave real configs alone: the shipped ones, large legal values, anchors."""
    for cfg in sorted((REPO / "configs/pretrain").glob("*.yaml")):
        proc, _ = vlpt("config", "--config", str(cfg))
        assert proc.returncode == 0, (cfg, proc.stderr[-2000:])
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text(f"include: {DEMO}\noptim: {{lr: 0.0001, warmup_steps: 1000000000}}\n"
                       f"train: {{max_steps: 1000000000, seed: 4294967295}}\n"
                       f"precision: {{min_loss_scale: &one 1.0}}\ntracking: {{request_timeout_s: *one}}\n")
    proc, _ = vlpt("config", "--config", str(anchors))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_steps: 1000000000" in proc.stdout and "seed: 4294967295" in proc.stdout
    assert "request_timeout_s: 1.0" in proc.stdout
