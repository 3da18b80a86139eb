"""A throwaway one-node Slurm cluster (Debian's slurm-wlm + munge) in a temp folder, for tests.

Needs root (slurmd starts jobs as their user) and the daemons on PATH; `SlurmCluster.unavailable()`
says why not. Everything lives under `root`: munge key and socket, slurm.conf, state, spool, logs.
Start with `start()`, always `stop()` (kills what it started, by pid).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def unavailable() -> str | None:
        """Why no cluster can be started here, or None."""
        if os.name != "posix" or os.geteuid() != 0:
            return "not root (slurmd runs jobs as their user; the test starts the daemons itself)"
        missing = [d for d in DAEMONS if not _which(d)]
        if missing:
            return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        return None

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 90) -> None:
        self._start_munge()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.out", "w")
            args = ["-D", "-f", str(self.conf)] + (["-i"] if daemon == "slurmctld" else ["-N", self.host])
            self.procs.append(subprocess.Popen([_which(daemon), *args], stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env))
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged refuses to run as root otherwise; -F keeps it our child to stop.
        self.procs.append(subprocess.Popen(
            [_which("munged"), "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(d / "munged.err", "w")))
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {(d / 'munged.err').read_text()[-2000:]}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=vlpttest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
PlugStackConfig={r}/plugstack.conf
NodeName={self.host} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "plugstack.conf").write_text("")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; {self.log_tail()}")
            state = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"node not idle after {timeout} s (sinfo: {state!r}); {self.log_tail()}")

    def run(self, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(argv[0]), *argv[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...)."""
        text = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            time.sleep(2)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job_fields(job_id)}")

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}:\n{path.read_text()[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel jobs (their slurmstepd outlive slurmd), then stop the daemons, newest first."""
        if self.procs and self.conf.exists():
            try:
                self.run(["scancel", "--full", "--user=root"], check=False, timeout=20)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(1)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
