"""`vlpt launch {local,deepspeed,slurm,k8s}`: rendered jobs, the frozen run config, submission."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, load_cluster_config
from cluster.job import plan_job
from cluster.launch import launch, render_job, write_job
from cluster.local import render_command
from trainer.config import load_config
from trainer.config_files import ConfigError
from vlpt.cli import main

CFG = "configs/pretrain/demo.yaml"
NOW = "20250101-120000"


def cluster(**raw) -> ClusterConfig:
    return load_cluster_config(None, raw)


def test_render_local_and_deepspeed():
    local = render_command("local", CFG, 4, ["--optim.lr=1e-4"], master_port=1234)
    assert local[0].endswith("torchrun")
    assert local[1:] == ["--nproc_per_node=4", "--master_port=1234", "-m", "vlpt", "pretrain",
                         "--config", CFG, "--optim.lr=1e-4"]
    ds = render_command("deepspeed", CFG, 2)
    assert ds[0].endswith("deepspeed") and ds[1:3] == ["--num_gpus", "2"]
    assert ds[-4:] == ["vlpt", "pretrain", "--config", CFG]


@pytest.mark.parametrize("args,needle", [(("slurm", CFG, 2), "slurm"), (("local", CFG, 0), "--nproc")])
def test_render_errors(args, needle):
    with pytest.raises(ConfigError, match=needle):
        render_command(*args)


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run-{now}"
    assert main(["launch", "local", "--config", CFG, "--nproc", "2", "--dry-run", "--train.max_steps=5",
                 f"--train.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=2" in out and "max_steps: 5" in out and "not written (--dry-run)" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["launch", "local", "--config", "nope.yaml"], "nope.yaml"),
    (["launch", "local", "--config", CFG, "--nodes", "2", "--dry-run"], "--nodes 1"),
    (["launch", "slurm", "--config", CFG, "--gpus-per-node", "4", "--nproc", "2", "--dry-run"], "one process per GPU"),
    (["launch", "k8s", "--config", CFG, "--dry-run"], "k8s.image"),
])
def test_cli_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_frozen_config_fixes_run_dir_and_resume(tmp_path):
    plan = plan_job("slurm", CFG, ["--train.resume=false", f"--train.run_dir={tmp_path}/r-{{now}}"],
                    cluster(), now=NOW)
    assert plan.run_dir == f"{tmp_path}/r-{NOW}" and plan.run_config.train.resume == "auto"
    assert plan.out_dir == f"{tmp_path}/r-{NOW}/launch" and plan.config_path == f"{plan.out_dir}/config.yaml"
    write_job(render_job(plan))
    assert load_config(plan.config_path) == plan.run_config  # the job reads back exactly this config
    assert (tmp_path / f"r-{NOW}" / "logs").is_dir()  # Slurm opens its --output there


def test_relative_run_dir_is_made_absolute_at_render_time(tmp_path, monkeypatch):
    config = Path(CFG).resolve()
    monkeypatch.chdir(tmp_path)
    plan = plan_job("local", str(config), [], cluster(), now=NOW)
    assert plan.run_dir == str(tmp_path / "runs/demo") and plan.workdir == str(tmp_path)  # the config's name


def test_rerender_with_another_config_is_refused(tmp_path):
    args = [f"--train.run_dir={tmp_path}/run"]
    write_job(render_job(plan_job("slurm", CFG, args, cluster())))
    write_job(render_job(plan_job("slurm", CFG, args, cluster())))  # the same job again: resubmission
    with pytest.raises(ConfigError, match="different config"):
        write_job(render_job(plan_job("slurm", CFG, [*args, "--optim.lr=1e-2"], cluster())))


# ---------------------------------------------------------------- Slurm


def bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


SLURM_FULL = dict(nodes=4, gpus_per_node=8, master_port=29511, max_restarts=3, env={"NCCL_DEBUG": "WARN"},
                  slurm={"partition": "gpu", "account": "proj", "time": "2-00:00:00", "cpus_per_task": 64,
                         "mem": "0", "signal_seconds": 600, "extra_sbatch": ["--exclusive"],
                         "setup": ["source .venv/bin/activate"], "torchrun": "torchrun"})


@pytest.mark.parametrize("raw", [SLURM_FULL, dict(gpus_per_node=0, nproc_per_node=2, slurm={"cpus_per_task": 2})])
def test_slurm_script(raw, tmp_path):
    plan = plan_job("slurm", CFG, [f"--train.run_dir={tmp_path}/run-{{now}}", "--parallel.timeout_minutes=20"],
                    cluster(**raw), now=NOW)
    script = render_job(plan).files["job.sbatch"]
    bash_n(script, tmp_path)
    c = plan.cluster
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --nodes={c.nodes}" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert f"#SBATCH --cpus-per-task={c.slurm.cpus_per_task}" in sbatch and "#SBATCH --requeue" in sbatch
    assert f"#SBATCH --signal=B:USR1@{c.slurm.signal_seconds}" in sbatch
    assert f"#SBATCH --output={plan.run_dir}/logs/slurm-%j.out" in sbatch
    assert (f"#SBATCH --gpus-per-node={c.gpus_per_node}" in sbatch) == bool(c.gpus_per_node)
    assert "#SBATCH --export=ALL" in sbatch and "unset DS_ACCELERATOR CUDA_VISIBLE_DEVICES" in script
    assert "trap stop_for_requeue USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    # the requeue comes after the training step has ended (its checkpoint saved), not at the signal
    assert script.index('wait_for $! && status=0') < script.index('scontrol requeue "$SLURM_JOB_ID"')
    assert f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={c.slurm.signal_seconds}" in script
    for flag in ('--nnodes="$SLURM_NNODES"', f"--nproc-per-node={c.procs_per_node}", "--rdzv-backend=c10d",
                 f'--rdzv-endpoint="$HEAD_NODE:{c.master_port}"', '--rdzv-id="$SLURM_JOB_ID"',
                 f"--max-restarts={c.max_restarts}", "--redirects=3", f"--config {plan.config_path}",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "parallel.timeout_minutes (20 min)"):
        assert flag in script, flag
    assert "{now}" not in script and "{{" not in script


def test_slurm_full_options(tmp_path):
    plan = plan_job("slurm", CFG, [f"--train.run_dir={tmp_path}/run"], cluster(**SLURM_FULL))
    script = render_job(plan).files["job.sbatch"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --mem=0", "#SBATCH --exclusive", "source .venv/bin/activate",
                 "export NCCL_DEBUG=WARN", "--cpus-per-task=64 --kill-on-bad-exit=1"):
        assert line in script, line
    # every #SBATCH line comes before the first command, or sbatch ignores it
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command


@pytest.mark.parametrize("raw,needle", [
    (dict(slurm={"time": "two days"}), "slurm.time"), (dict(slurm={"partition": "a b"}), "slurm.partition"),
    (dict(slurm={"extra_sbatch": ["exclusive"]}), "extra_sbatch"), (dict(nodes=0), "nodes"),
    (dict(slurm={"setup": ["a\nb"]}), "one shell line"), (dict(slurmm={}), "did you mean 'slurm'"),
])
def test_bad_cluster_config(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        cluster(**raw)


def test_slurm_refuses_paths_with_blanks(tmp_path):
    plan = plan_job("slurm", CFG, [f"--train.run_dir={tmp_path}/my run"], cluster())
    with pytest.raises(ConfigError, match="Slurm job needs a path"):
        render_job(plan)


def fake_tool(tmp_path: Path, name: str, reply: str) -> Path:
    """A stand-in for sbatch / kubectl on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/{name}.args\necho "{reply}"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("target,tool,file", [("slurm", "sbatch", "job.sbatch"),
                                              ("k8s", "kubectl", "pytorchjob.yaml")])
def test_submit_runs_the_cluster_tool(target, tool, file, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", f"{fake_tool(tmp_path, tool, 'Submitted')}:{os.environ['PATH']}")
    k8s = {"image": "img:1", "runs_claim": "runs", "runs_mount": "/workspace/vlpt/runs"}
    run_dir = f"{tmp_path}/run" if target == "slurm" else "runs/x"
    out = tmp_path / "out"
    assert launch(target, CFG, [f"--train.run_dir={run_dir}"], "submit", out=str(out), k8s=k8s) == 0
    args = (tmp_path / f"{tool}.args").read_text().split()
    assert args[-1] == str(out / file) and (out / file).is_file() and (out / "config.yaml").is_file()
    assert "Submitted" in capfd.readouterr().out


# ---------------------------------------------------------------- DeepSpeed / local


def test_deepspeed_hostfile_and_command(tmp_path):
    plan = plan_job("deepspeed", CFG, [f"--train.run_dir={tmp_path}/run"],
                    cluster(nodes=2, gpus_per_node=4, deepspeed={"hosts": ["n1", "n2", "n3"]}))
    job = render_job(plan)
    assert job.files["hostfile"] == "n1 slots=4\nn2 slots=4\n"
    script = job.files["launch.sh"]
    bash_n(script, tmp_path)
    cmd = script.splitlines()[-1]
    for part in (f"--hostfile {plan.out_dir}/hostfile", "--num_nodes 2", "--num_gpus 4", "--master_addr n1",
                 f"--enable_each_rank_log {plan.run_dir}/logs/deepspeed", "--module vlpt pretrain",
                 f"--config {plan.config_path}"):
        assert part in cmd, part
    with pytest.raises(ConfigError, match="deepspeed.hosts"):
        render_job(plan_job("deepspeed", CFG, [], cluster(nodes=3, deepspeed={"hosts": ["n1"]})))


def test_local_script(tmp_path):
    plan = plan_job("local", CFG, [f"--train.run_dir={tmp_path}/run"], cluster(gpus_per_node=0, nproc_per_node=2))
    script = render_job(plan).files["launch.sh"]
    bash_n(script, tmp_path)
    assert f"cd {os.getcwd()}" in script and "--nproc_per_node=2" in script and "--max-restarts=1" in script
    assert f"--log-dir={plan.run_dir}/logs/local" in script and f"--config {plan.config_path}" in script


@pytest.mark.parametrize("target, file", [("local", "launch.sh"), ("deepspeed", "launch.sh"),
                                          ("slurm", "job.sbatch"), ("k8s", "pytorchjob.yaml")])
def test_a_finetune_config_launches_vlpt_finetune(tmp_path, target, file):
    """`stage: finetune` configs run under `vlpt finetune` on every target (`vlpt pretrain` refuses them)."""
    run_dir = "/workspace/vlpt/runs/ft" if target == "k8s" else f"{tmp_path}/run"
    where = cluster(k8s={"image": "registry.example/vlpt:1", "runs_claim": "runs"}) if target == "k8s" else cluster()
    plan = plan_job(target, "configs/finetune/demo-vqa.yaml", [f"--train.run_dir={run_dir}"], where, now=NOW)
    text = render_job(plan).files[file]
    assert "vlpt finetune" in text or '"finetune"' in text or "- finetune" in text
    assert "pretrain" not in text.replace("pretrain:", "")
