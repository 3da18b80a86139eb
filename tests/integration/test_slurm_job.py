"""Acceptance: the sbatch script of `vlpt launch slurm` runs a 2-process CPU job to completion on a
one-node Slurm cluster (Debian's slurm-wlm + munge) that the test starts as root, through a requeue
with resume; skipped, with the reason, where that cannot be done (`make test` installs the packages
when it runs as root, see .ci/install_test_services.sh)."""
import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, subprocess_env, write_tiny_config
from tests.slurm_cluster import FINAL_STATES, SlurmCluster

pytestmark = pytest.mark.slow

SECRET = "PLANTED-slurm-5e1d-SECRET"


@pytest.fixture
def slurm(tmp_path_factory):
    reason = SlurmCluster.unavailable()
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        cluster.stop()
        pytest.skip(f"Slurm daemons did not start: {e}")
    yield cluster
    cluster.stop()


def test_sbatch_job_runs_requeues_on_usr1_and_resumes(tmp_path, demo_data, slurm):
    """One job, two starts: a 2-process CPU run gets USR1 (what --signal sends before the time
    limit) once it has a checkpoint; its trap stops the training (one SIGTERM to each rank, through
    torchrun), waits for the checkpoint of the step it stopped at, requeues, and the second start
    resumes from exactly that step. The submitting shell's DS_ACCELERATOR=cpu is dropped in the job:
    DeepSpeed finds the CPU by itself."""
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run-{now}", optim={"global_batch_size": 16},
                            train={"max_steps": 400, "save_every": 20, "log_every": 20})
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text("nodes: 1\ngpus_per_node: 0\nnproc_per_node: 2\nmax_restarts: 0\n"
                            "rdzv_timeout_s: 300\nslurm: {cpus_per_task: 2, signal_seconds: 60}\n")
    # The job inherits this environment (sbatch --export=ALL), the planted credentials included.
    env = {**subprocess_env(), **slurm.env, "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET,
           "DS_ACCELERATOR": "cpu"}
    launch = subprocess.run([sys.executable, "-m", "vlpt", "launch", "slurm", "--config", str(cfg),
                             "--cluster", str(cluster_yaml), "--master-port", str(free_port()), "--submit"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0, launch.stdout + launch.stderr
    job_id = re.search(r"Submitted batch job (\d+)", launch.stdout).group(1)
    run_dir = next(tmp_path.glob("run-*"))  # {now} was filled once, at render time
    logs = run_dir / "logs"
    t0 = time.monotonic()

    _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 400, slurm, job_id, logs)
    slurm.run(["scancel", "--signal=USR1", "--batch", job_id])
    _start_requeued_job_now(slurm, job_id, logs)
    fields = slurm.wait_job(job_id, timeout=600)
    wall = time.monotonic() - t0
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", _report(fields, slurm, logs, wall)
    print(f"slurm job {job_id}: {fields['JobState']} after {wall:.0f} s, {fields['Restarts']} requeue")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (400, 2)
    assert 0 < summary["steps_this_run"] < 400  # the second start resumed from a checkpoint
    batch_log = (logs / f"slurm-{job_id}.out").read_text()
    assert "requeueing" in batch_log and f"job {job_id} start 1" in batch_log
    assert re.search(r"training stopped \d+ s after USR1 \(exit \d+\); requeueing", batch_log), batch_log
    # the ranks saved where they stopped (not only the last periodic checkpoint), and the job went on from there
    first = (logs / f"slurm-{job_id}-requeue0" / "node0.out").read_text()
    stopped = {int(m) for m in re.findall(r"stopped by SIGTERM after step (\d+)", first)}
    assert len(stopped) == 1 and summary["steps_this_run"] == 400 - stopped.pop(), first[-3000:]
    for start in (0, 1):  # per-rank logs of both starts
        node_dir = logs / f"slurm-{job_id}-requeue{start}"
        ranks = sorted(p.parent.name for p in node_dir.glob("node0/*/attempt_0/*/stdout.log"))
        assert ranks == ["0", "1"], list(node_dir.rglob("*"))
    assert "vlpt pretrain: done" in (logs / f"slurm-{job_id}-requeue1" / "node0.out").read_text()
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        assert SECRET.encode() not in path.read_bytes(), path


def _wait_for(condition, timeout, slurm, job_id, logs) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        fields = slurm.job_fields(job_id)
        if fields.get("JobState") in FINAL_STATES or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {_report(fields, slurm, logs, timeout)}")
        time.sleep(0.5)


def _start_requeued_job_now(slurm, job_id, logs, timeout=120) -> None:
    """Slurm holds a requeued job back (PENDING, Reason=BeginTime) for minutes; start it at once, but
    only once the first start's batch step is gone from the node and a second has passed: the script
    requeues as it ends, and slurmd refuses a launch in the same second as that requeue's kill ("Job
    already killed, do not launch batch job"), which the hold prevents on a real cluster."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = slurm.job_fields(job_id)
        if fields.get("Restarts") == "1" and fields.get("JobState") == "PENDING":
            slurmd_log = slurm.root / "slurmd.log"
            if f"[{job_id}.batch] done with job" not in (slurmd_log.read_text() if slurmd_log.is_file() else ""):
                time.sleep(0.5)
                continue
            time.sleep(2)
            slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            return
        if fields.get("Restarts") == "1" and fields.get("JobState") == "RUNNING" or \
                fields.get("JobState") in FINAL_STATES:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not requeued: {_report(slurm.job_fields(job_id), slurm, logs, timeout)}")


def _report(fields, slurm, logs, wall) -> str:
    outs = sorted(logs.glob("slurm-*"))
    return (f"{fields.get('JobState')} {fields.get('ExitCode')} after {wall:.0f} s\n"
            f"{_tail(*outs, *logs.glob('slurm-*/node0.out'))}\n{slurm.log_tail()}")


def _tail(*paths) -> str:
    return "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for p in paths if p.is_file())
