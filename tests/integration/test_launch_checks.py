"""`vlpt launch` checks the run config at the job's world size before it writes anything, and warns
about paths the nodes may not share."""
import pytest

from cluster.checks import check_run_config, unshared_path_warnings
from cluster.config import load_cluster_config
from cluster.job import plan_job
from tests.conftest import REPO
from trainer.config import load_config
from trainer.config_files import ConfigError
from vlpt.cli import main

ALBEF = str(REPO / "configs/pretrain/demo-albef.yaml")  # queue 256, micro-batch 64, no global batch set
UNITER = str(REPO / "configs/pretrain/demo.yaml")


@pytest.fixture
def cluster_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes: 2\ngpus_per_node: 8\ndeepspeed: {hosts: [n1, n2]}\n"
                    "k8s: {image: img:1, runs_claim: runs}\n")
    return path


@pytest.mark.parametrize("target", ["slurm", "k8s", "deepspeed"])
@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--submit"]])
def test_albef_queue_that_does_not_divide_the_global_batch_is_refused_before_writing(
        target, mode, tmp_path, cluster_yaml, monkeypatch, capsys):
    """2 nodes x 8 GPUs x 64 = a global batch of 1024, which a queue of 256 cannot hold whole: found at
    render time (it loads, and runs on one process), not after the job waited for its nodes."""
    monkeypatch.chdir(tmp_path)  # k8s renders into runs/k8s/<job> under the working directory
    run_dir = "runs/albef" if target == "k8s" else str(tmp_path / "run")
    out = tmp_path / "out"
    argv = ["launch", target, "--config", ALBEF, "--cluster", str(cluster_yaml), f"--train.run_dir={run_dir}",
            "--out", str(out), *mode]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert "model.queue_size=256 must be a multiple of the global batch 1024" in captured.err
    assert "world size 16" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml"]  # no job folder, no run dir
    # the same config at a world size whose global batch divides the queue renders
    assert main([*argv[:-len(mode) or None], "--nodes", "1", "--gpus-per-node", "2", "--dry-run"]) == 0


def test_global_batch_that_the_world_size_does_not_divide_is_refused():
    cfg = load_config(UNITER, ["--optim.global_batch_size=192"])
    check_run_config(cfg, 3)  # 192 = 64 x 3
    with pytest.raises(ConfigError, match="must be a multiple of data.micro_batch_size x world size = 64 x 16"):
        check_run_config(cfg, 16)


def test_albef_layout_at_start_is_the_same_check(tmp_path):
    """`attach` (at start) and `vlpt launch` share the recipe's check_layout."""
    import torch

    from tests.conftest import write_albef_config
    from trainer.engine import batch_layout
    from trainer.recipes import recipe_class

    cfg = load_config(ALBEF)
    recipe = recipe_class("albef")
    recipe.check_layout(cfg, batch_layout(cfg.optim, 64, 4))  # 256 = 256 x 1
    with pytest.raises(ValueError, match="model.queue_size=256"):
        recipe.check_layout(cfg, batch_layout(cfg.optim, 64, 8))
    tiny = load_config(str(write_albef_config(tmp_path, tmp_path, "albef", 1, optim={"global_batch_size": None})))
    tiny_recipe = recipe_class("albef")(tiny)
    model = tiny_recipe.build_model()
    tiny_recipe.attach(model, batch_layout(tiny.optim, 8, 2), torch.device("cpu"))  # queue 48 = 3 x 16
    with pytest.raises(ValueError, match="model.queue_size=48 must be a multiple of the global batch 32"):
        tiny_recipe.attach(model, batch_layout(tiny.optim, 8, 4), torch.device("cpu"))


def _warnings(target, tmp_path, overrides, shared=("/shared", "/fsx"), **cluster):
    raw = {"nodes": 2, "gpus_per_node": 8, "shared_paths": list(shared), "deepspeed": {"hosts": ["n1", "n2"]},
           "k8s": {"image": "img:1", "runs_claim": "runs"}, **cluster}
    return unshared_path_warnings(plan_job(target, UNITER, overrides, load_cluster_config(None, raw)))


def test_paths_outside_the_shared_prefixes_warn_one_line_each(tmp_path):
    overrides = ["--data.train=/scratch/local/train", "--data.val=s3://bucket/val",
                 "--data.tokenizer.path=/fsx/vocab.txt", f"--train.run_dir={tmp_path}/run"]
    lines = _warnings("slurm", tmp_path, overrides)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("vlpt launch: warning: data.train=/scratch/local/train is under none of the "
                               "cluster's shared_paths (/shared, /fsx)")
    assert f"train.run_dir={tmp_path}/run" in lines[1] and "requeued" in lines[1]


def test_paths_under_shared_prefixes_s3_and_one_host_jobs_do_not_warn(tmp_path):
    shared = ["--data.train=/shared/data/train", "--data.val=s3://bucket/val",
              "--data.tokenizer.path=/fsx/vocab.txt", "--train.run_dir=/shared/runs/x"]
    assert _warnings("slurm", tmp_path, shared) == []
    local = ["--data.train=/scratch/train", f"--train.run_dir={tmp_path}/run"]
    assert _warnings("local", tmp_path, local, nodes=1) == []  # this machine only
    assert _warnings("deepspeed", tmp_path, local, nodes=1) == []
    assert _warnings("slurm", tmp_path, local, shared=()) == []  # no shared_paths declared: unchecked
    # a prefix matches whole path components only
    lines = _warnings("slurm", tmp_path, ["--data.train=/sharedfoo/train", *shared[1:]])
    assert len(lines) == 1 and "data.train=/sharedfoo/train" in lines[0]


def test_k8s_runs_volume_counts_as_shared(tmp_path):
    lines = _warnings("k8s", tmp_path, ["--data.train=/data/train", "--data.val=s3://b/val",
                                        "--data.tokenizer.path=/shared/vocab.txt",
                                        "--train.run_dir=runs/x"])
    assert len(lines) == 1 and lines[0].startswith("vlpt launch: warning: data.train=/data/train")


def test_cli_prints_the_warnings_and_still_renders(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 2\ngpus_per_node: 8\nshared_paths: [/shared]\n")
    assert main(["launch", "slurm", "--config", UNITER, "--cluster", str(cluster), "--dry-run",
                 "--data.train=/local/train", f"--train.run_dir={tmp_path}/run"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split("=")[0] for line in err] == ["vlpt launch: warning: data.train", "vlpt launch: warning: "
                                                    "data.val", "vlpt launch: warning: data.tokenizer.path",
                                                    "vlpt launch: warning: train.run_dir"]


def test_relative_shared_prefix_is_refused():
    with pytest.raises(ConfigError, match="shared_paths"):
        load_cluster_config(None, {"shared_paths": ["shared"]})


def test_a_fine_tuning_job_checks_its_task_feature_and_init_folders(tmp_path):
    """A fine-tuning job reads finetune.train / val / features and init_from, not data.train: those warn."""
    raw = {"nodes": 2, "gpus_per_node": 8, "shared_paths": ["/shared"], "deepspeed": {"hosts": ["n1", "n2"]}}
    overrides = ["--finetune.train=/shared/ve/train", "--finetune.val=/local/ve/val",
                 "--finetune.features=[/local/pictures]", "--finetune.init_from=/local/runs/demo-albef",
                 "--data.tokenizer.path=/shared/vocab.txt", "--train.run_dir=/shared/runs/ve"]
    plan = plan_job("slurm", "configs/finetune/demo-albef-ve.yaml", overrides, load_cluster_config(None, raw))
    keys = [line.split("=")[0].removeprefix("vlpt launch: warning: ") for line in unshared_path_warnings(plan)]
    assert keys == ["finetune.val", "finetune.features[0]", "finetune.init_from"]
    check_run_config(plan.run_config, 16)  # VE has no queue: any global batch splits
