"""The Dockerfile of the k8s image, linted without a Docker daemon: its instructions parse, the base is a
CUDA image pinned by tag, every Python package is pinned, the image runs as a non-root user in the
k8s template's working directory, and .dockerignore keeps environments, runs and credentials out."""
import json
import re
import shlex

import pytest

from cluster.config import K8sConfig
from tests.conftest import REPO

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
PINNED = re.compile(r"^[A-Za-z0-9_.\[\],-]+==[A-Za-z0-9_.+!-]+$")


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, `\\` continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if stripped.endswith("\\"):
            continue
        word, _, args = pending.strip().partition(" ")
        if word.upper() not in INSTRUCTIONS:
            raise ValueError(f"unknown instruction {word!r}")
        out.append((word.upper(), args.strip()))
        pending = ""
    if pending:
        raise ValueError("the last instruction ends with a continuation")
    return out


def pip_installs(args: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN line."""
    words = shlex.split(args)
    found = []
    for i, word in enumerate(words):
        if word == "pip" and i + 1 < len(words) and words[i + 1] == "install":
            rest = []
            for w in words[i + 2:]:
                if w in ("&&", ";", "||", "|"):
                    break
                rest.append(w)
            found.append(rest)
    return found


def lint(text: str) -> list[str]:
    """What is wrong with a Dockerfile by this project's rules (empty: nothing)."""
    problems = []
    instructions = parse(text)
    froms = [args for name, args in instructions if name == "FROM"]
    names = [name for name, _ in instructions]
    if not froms or any(name != "ARG" for name in names[:names.index("FROM")]):
        problems.append("FROM is not the first instruction (only ARG may come before it)")
    for image in froms:
        ref = image.split()[0]
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        if not tag or "$" in tag:
            problems.append(f"FROM {ref}: not pinned by a tag")
        if not re.match(r"^(nvidia/cuda|pytorch/pytorch)$", name):
            problems.append(f"FROM {ref}: not a CUDA image (nvidia/cuda or pytorch/pytorch)")
    if re.search(r"\blatest\b", text):
        problems.append("`latest` is named")
    for name, args in instructions:
        if name != "RUN":
            continue
        for install in pip_installs(args):
            packages = [w for i, w in enumerate(install) if not w.startswith("-")
                        and not (i and install[i - 1] in ("-r", "--index-url", "--extra-index-url", "-c"))]
            for package in packages:
                if package != "." and not PINNED.match(package):
                    problems.append(f"pip install {package}: not pinned with ==")
    users = [args for name, args in instructions if name == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root: end with USER <non-root>")
    for name, args in instructions:
        if name == "ENV" and re.search(r"\b(DS_ACCELERATOR|CUDA_VISIBLE_DEVICES)=", args):
            problems.append(f"ENV {args}: a host's setting baked into the image")
    return problems


DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_the_dockerfile_passes_the_lint():
    assert lint(DOCKERFILE) == []


def test_every_requirement_is_pinned_and_the_image_torch_is_requirements_torch():
    lines = [line.split("#")[0].split(";")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    assert all(PINNED.match(f"{name}=={version}") for name, version in pins.items())
    installs = [i for name, args in parse(DOCKERFILE) if name == "RUN" for i in pip_installs(args)]
    torch = [w for install in installs for w in install if w.startswith("torch==")]
    assert torch == [f"torch=={pins['torch']}"]
    # the remaining pins come from requirements.txt itself, less the test-only packages
    assert any("-r" in install for install in installs) and "COPY requirements.txt ." in DOCKERFILE


def test_the_image_fits_the_k8s_template():
    instructions = parse(DOCKERFILE)
    workdirs = [args for name, args in instructions if name == "WORKDIR"]
    assert workdirs[-1] == K8sConfig().workdir  # relative paths of a run config resolve there
    entrypoint = [json.loads(args) for name, args in instructions if name == "ENTRYPOINT"]
    assert entrypoint == [["vlpt"]]  # exec form; the PyTorchJob's `command` (torchrun) replaces it
    for name, args in instructions:
        if name in ("COPY", "ADD"):
            sources = [w for w in shlex.split(args)[:-1] if not w.startswith("--")]
            assert all((REPO / s).exists() for s in sources), args


def test_dockerignore_keeps_environments_runs_and_credentials_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "mlruns", "demo_data", ".deepspeed_env", ".env", ".aws"} <= ignored


BROKEN = {
    "untagged base": ("FROM nvidia/cuda:12.8.1-base-ubuntu24.04", "FROM nvidia/cuda"),
    "latest base": ("FROM nvidia/cuda:12.8.1-base-ubuntu24.04", "FROM nvidia/cuda:latest"),
    "not a CUDA base": ("FROM nvidia/cuda:12.8.1-base-ubuntu24.04", "FROM python:3.12-slim"),
    "unpinned torch": ("torch==2.13.0", "torch"),
    "loosely pinned torch": ("torch==2.13.0", "torch>=2.11"),
    "root user": ("USER 1000:1000", "USER root"),
    "forced accelerator": ("ENV HOME=/home/vlpt", "ENV HOME=/home/vlpt DS_ACCELERATOR=cpu"),
    "unknown instruction": ("USER 1000:1000", "USR 1000:1000"),
    "RUN before FROM": ("FROM nvidia/cuda:12.8.1-base-ubuntu24.04",
                        "RUN true\nFROM nvidia/cuda:12.8.1-base-ubuntu24.04"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_the_lint_catches(breakage):
    old, new = BROKEN[breakage]
    assert DOCKERFILE.count(old) >= 1, old
    broken = DOCKERFILE.replace(old, new)
    try:
        assert lint(broken), breakage
    except ValueError:  # unparseable is caught too
        assert breakage == "unknown instruction"
