"""The rendered sbatch script run by bash against stand-ins for srun / scancel / scontrol / torchrun:
what environment reaches the nodes, and what happens at USR1 (one SIGTERM to each node's torchrun,
the script waits for the save, then requeues). tests/integration/test_slurm_job.py runs it on Slurm."""
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import load_cluster_config
from cluster.job import plan_job
from cluster.launch import render_job

CFG = "configs/pretrain/demo.yaml"

# srun: its options, then the node task, started in a session of its own as Slurm starts a step
# (scancel signals every process of it, which the stand-in does by process group).
FAKE_SRUN = """#!/bin/bash
env > "$FAKE_DIR/srun.env"
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0
setsid "$@" &
echo $! > "$FAKE_DIR/step.pgid"
wait $!
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/events"
sig=${1#--signal=}
kill -s "$sig" -- "-$(cat "$FAKE_DIR/step.pgid")"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
    show) echo node0 ;;
    requeue) echo "requeue $2" >> "$FAKE_DIR/events" ;;
esac
"""
# torchrun: counts the SIGTERMs it gets; after the first it "saves" for a second (a later one would
# have ended a real rank at once), then exits 143 as the trainer does. Without one it runs `seconds`.
FAKE_TORCHRUN = f"""#!{sys.executable}
import os, signal, sys, time
fake = os.environ["FAKE_DIR"]
terms = []
signal.signal(signal.SIGTERM, lambda *_: terms.append(time.time()))
with open(os.path.join(fake, "torchrun.env"), "w") as f:
    f.write("\\n".join(f"{{k}}={{v}}" for k, v in os.environ.items()))
open(os.path.join(fake, "started"), "w").close()
deadline = time.time() + float(os.environ.get("FAKE_RUN_S", "60"))
while not terms and time.time() < deadline:
    time.sleep(0.05)
if not terms:
    sys.exit(0)
time.sleep(1.0)
with open(os.path.join(fake, "events"), "a") as f:
    f.write(f"saved after {{len(terms)}} SIGTERM\\n")
sys.exit(143)
"""


def fake_tools(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL),
                       ("torchrun", FAKE_TORCHRUN)):
        tool = bin_dir / name
        tool.write_text(text)
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def render_script(tmp_path: Path, bin_dir: Path, env: dict | None = None) -> Path:
    cluster = load_cluster_config(None, {"nodes": 1, "gpus_per_node": 8, "env": env or {},
                                         "slurm": {"torchrun": str(bin_dir / "torchrun"), "signal_seconds": 90}})
    plan = plan_job("slurm", CFG, [f"--train.run_dir={tmp_path}/run"], cluster)
    script = tmp_path / "job.sbatch"
    script.write_text(render_job(plan).files["job.sbatch"])
    os.makedirs(f"{tmp_path}/run/logs", exist_ok=True)
    return script


def start(script: Path, tmp_path: Path, bin_dir: Path, **extra) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", **extra}
    return subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def test_usr1_stops_torchrun_once_waits_for_the_save_then_requeues(tmp_path):
    bin_dir = fake_tools(tmp_path)
    proc = start(render_script(tmp_path, bin_dir), tmp_path, bin_dir)
    wait_for_file(tmp_path / "started", proc)
    time.sleep(0.3)  # the node task's traps are set right after torchrun starts
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@<s> sends the batch shell
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    events = (tmp_path / "events").read_text().splitlines()
    assert events == [f"scancel --signal={int(signal.SIGURG)} 77", "saved after 1 SIGTERM", "requeue 77"], out
    assert "got USR1" in out and "training stopped" in out and "s after USR1 (exit 143); requeueing" in out


def test_a_finished_run_is_not_requeued(tmp_path):
    bin_dir = fake_tools(tmp_path)
    proc = start(render_script(tmp_path, bin_dir), tmp_path, bin_dir, FAKE_RUN_S="0.2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert not (tmp_path / "events").exists() and "requeueing" not in out


def test_host_local_settings_do_not_reach_the_nodes(tmp_path):
    """The job inherits the environment of `sbatch` (credentials, PATH) but not the settings of the
    submitting machine; the cluster's env: may set them for the nodes."""
    bin_dir = fake_tools(tmp_path)
    script = render_script(tmp_path, bin_dir, env={"MKL_NUM_THREADS": "4"})
    submitting = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1", "AWS_PROFILE": "training", "VIRTUAL_ENV": "/shared/venv"}
    proc = start(script, tmp_path, bin_dir, FAKE_RUN_S="0.2", **submitting)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for where in ("srun.env", "torchrun.env"):
        env = read_env(tmp_path / where)
        for name in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
            assert name not in env, (where, name)
        assert env["MKL_NUM_THREADS"] == "4" and env["AWS_PROFILE"] == "training", where
        assert env["VIRTUAL_ENV"] == "/shared/venv" and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90", where


@pytest.mark.parametrize("gpus,kept", [(8, False), (0, True)])
@pytest.mark.parametrize("target", ["local", "deepspeed"])
def test_launch_sh_of_a_gpu_job_drops_ds_accelerator(target, gpus, kept, tmp_path, monkeypatch):
    """launch.sh runs on this machine: a CPU job keeps DS_ACCELERATOR=cpu, a GPU job drops it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed"):  # the launchers beside the Python that renders
        tool = bin_dir / name
        tool.write_text(f'#!/bin/bash\nenv > "{tmp_path}/launcher.env"\n')
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    cluster = load_cluster_config(None, {"gpus_per_node": gpus, "nproc_per_node": None if gpus else 2})
    plan = plan_job(target, CFG, [f"--train.run_dir={tmp_path}/run"], cluster)
    script = tmp_path / "launch.sh"
    script.write_text(render_job(plan).files["launch.sh"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    assert ("DS_ACCELERATOR" in read_env(tmp_path / "launcher.env")) == kept


@pytest.mark.parametrize("gpus", [8, 0])
@pytest.mark.parametrize("target", ["local", "deepspeed", "slurm", "k8s"])
def test_no_render_sets_ds_accelerator(target, gpus, tmp_path, monkeypatch):
    """With DS_ACCELERATOR=cpu in the submitting shell, no rendered file sets or exports it (what runs
    them is tested above); the k8s pod's environment is the manifest's alone, and never names it."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    raw = {"nodes": 1, "gpus_per_node": gpus, "k8s": {"image": "img:1", "runs_claim": "runs"}}
    run_dir = "runs/x" if target == "k8s" else f"{tmp_path}/run"
    plan = plan_job(target, CFG, [f"--train.run_dir={run_dir}"], load_cluster_config(None, raw))
    for name, text in render_job(plan).files.items():
        assert "DS_ACCELERATOR=" not in text and "export DS_ACCELERATOR" not in text, name
        if target == "k8s":
            assert "DS_ACCELERATOR" not in text, name
