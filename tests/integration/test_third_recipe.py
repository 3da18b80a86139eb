"""A model family added from outside the package (tests/toy_recipe.py) trains through `vlpt pretrain`."""
import json

import pytest

from data.tokenizer import load_tokenizer
from tests.conftest import REPO, read_metrics, run_vlpt, write_tiny_config

pytestmark = pytest.mark.slow
TOY = {"VLPT_RECIPES": "tests.toy_recipe"}


def toy_config(tmp_path, demo_data, run_dir):
    vocab = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt")).vocab_size
    cfg = write_tiny_config(tmp_path / "toy.yaml", demo_data, run_dir,
                            train={"max_steps": 5, "save_every": 0, "log_every": 1})
    text = cfg.read_text()
    import yaml

    raw = yaml.safe_load(text)
    raw["model"] = {"arch": "toy", "vocab_size": vocab, "img_dim": 16, "hidden_size": 8}
    raw["tasks"] = {"match": 1}
    raw["data"].pop("val")
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_a_registered_family_trains_five_steps_and_resumes(tmp_path, demo_data):
    run_dir = tmp_path / "toy"
    cfg = toy_config(tmp_path, demo_data, run_dir)
    run_vlpt(["pretrain", "--config", str(cfg), "--train.stop_after_steps=3"], env=TOY)
    run_vlpt(["pretrain", "--config", str(cfg)], env=TOY)  # resumes at step 3
    losses = {r["step"]: r["match_loss"] for r in read_metrics(run_dir) if r.get("task") == "match"}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert all(0.0 < v < 10.0 for v in losses.values()), losses
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["steps_this_run"] == 2 and summary["task_counts"] == {"match": 5}
    assert (run_dir / "checkpoints" / "step_00000005" / "trainer_state.json").is_file()


def test_an_unknown_family_names_the_known_ones_and_the_plugin_variable(tmp_path, demo_data):
    cfg = toy_config(tmp_path, demo_data, tmp_path / "toy")
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)  # VLPT_RECIPES not set
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.arch='toy' is not a known model family" in last and "albef, uniter" in last
    assert "VLPT_RECIPES" in last
