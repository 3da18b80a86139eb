"""The task mix: (dataset, task) pairs, per-dataset ratios, the ready UNITER configs."""
import collections

import pytest
import yaml

from trainer.config import load_config
from trainer.config_files import ConfigError
from trainer.engine import BatchLayout, accum_sum_factor, build_deepspeed_config
from trainer.task_mix import draw_task, mix_ratios, task_mix, task_of


def config(tmp_path, body: dict):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_config(str(path))


def test_single_dataset_keys_are_task_names(tmp_path):
    cfg = config(tmp_path, {"data": {"train": "t", "val": "v"}, "tasks": {"mlm": 2, "itm": 1, "mrfr": 0}})
    mix = task_mix(cfg)
    assert [e.key for e in mix] == ["itm", "mlm"]  # ratio 0 dropped, sorted
    # paths in a config file are relative to its folder
    assert all(e.task == e.key and e.sources[0].train == str(tmp_path / "t") and e.sources[0].val == str(tmp_path / "v")
               for e in mix)
    assert mix_ratios(cfg) == {"itm": 1.0, "mlm": 2.0}


def test_datasets_carry_their_own_ratios_or_inherit(tmp_path):
    cfg = config(tmp_path, {
        "tasks": {"mlm": 3, "itm": 1},
        "data": {"datasets": [
            {"name": "coco", "train": "c/train", "val": "c/val", "tasks": {"itm": 6, "mrc-kl": 4}},
            {"name": "vg", "train": "v/train"},  # inherits the top-level tasks
        ]}})
    by_key = {e.key: e for e in task_mix(cfg)}
    assert set(by_key) == {"coco/itm", "coco/mrc-kl", "vg/mlm", "vg/itm"}
    assert by_key["coco/mrc-kl"].task == "mrc-kl" and by_key["coco/mrc-kl"].ratio == 4
    assert by_key["coco/itm"].sources[0].val == str(tmp_path / "c/val") and by_key["vg/mlm"].sources[0].val is None
    assert by_key["vg/mlm"].ratio == 3 and by_key["vg/mlm"].sources[0].train == str(tmp_path / "v/train")
    assert task_of("coco/mrc-kl") == "mrc-kl" and task_of("mlm") == "mlm"


def test_draws_follow_per_dataset_ratios(tmp_path):
    cfg = config(tmp_path, {"data": {"datasets": [
        {"name": "a", "train": "a", "tasks": {"itm": 6, "mlm": 8}},
        {"name": "b", "train": "b", "tasks": {"itm": 9, "mlm": 12}}]}})
    ratios = mix_ratios(cfg)
    n = 20000
    counts = collections.Counter(draw_task(42, step, ratios) for step in range(n))
    total = sum(ratios.values())
    for key, ratio in ratios.items():
        assert counts[key] / n == pytest.approx(ratio / total, abs=0.01), key


@pytest.mark.parametrize("body,needle", [
    ({"data": {"datasets": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}]}}, "unique"),
    ({"data": {"datasets": [{"name": "a/b", "train": "x"}]}}, "a/b"),
    ({"data": {"datasets": [{"name": "a", "train": ""}]}}, "data.datasets[0]: train"),
    ({"data": {"datasets": [{"name": "a", "train": "x", "tasks": {"mrm": 1}}]}}, "data.datasets.a.tasks"),
    ({"data": {"datasets": [{"name": "a", "train": "x", "tasks": {"mlm": 0}}]}}, "must not all be 0"),
    ({"data": {"datasets": [{"name": "a", "train": "x", "tasks": {"mlm": -1}}]}}, "data.datasets.a.tasks.mlm"),
    ({"data": {"datasets": [{"name": "a", "train": "x", "path": "y"}]}}, "data.datasets[0].path"),
])
def test_bad_datasets_are_config_errors(tmp_path, body, needle):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, body)
    assert needle in str(e.value)


@pytest.mark.parametrize("name,datasets,ratios,accum", [
    ("indomain", ["coco", "vg"], {"coco": (2, 2, 1, 1), "vg": (2, 2, 1, 1)}, 2),
    ("alldata", ["cc", "coco", "sbu", "vg"],
     {"coco": (6, 8, 4, 4), "vg": (9, 12, 6, 6), "cc": (9, 12, 6, 6), "sbu": (6, 8, 4, 4)}, 6),
])
def test_ready_uniter_configs_hold_uniters_recipe(name, datasets, ratios, accum):
    cfg = load_config(f"configs/pretrain/uniter-base-{name}.yaml")
    assert sorted(d.name for d in cfg.data.datasets) == datasets
    got = mix_ratios(cfg)
    for ds, (itm, mlm, mrfr, mrc_kl) in ratios.items():
        assert (got[f"{ds}/itm"], got[f"{ds}/mlm"], got[f"{ds}/mrfr"], got[f"{ds}/mrc-kl"]) == (itm, mlm, mrfr, mrc_kl)
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.grad_clip) == (5e-5, (0.9, 0.98), 1e-6, 0.01, 10000, 5.0)
    assert o.schedule == "linear" and o.accum_sum_semantics and cfg.train.max_steps == 200000
    assert cfg.data.max_txt_len == 60 and cfg.data.uniter.mrm_prob == 0.15 and cfg.data.uniter.itm_neg_prob == 0.5
    assert (cfg.wra.weight, cfg.wra.beta, cfg.wra.iterations, cfg.wra.k) == (0.1, 0.5, 50, 1)
    assert cfg.model.hidden_size == 768 and cfg.model.num_hidden_layers == 12
    # On UNITER's 8 GPUs the derived accumulation is UNITER's, and the clip its summed one.
    layout = BatchLayout(cfg.data.micro_batch_size, o.global_batch_size // (8 * cfg.data.micro_batch_size), 8)
    assert layout.grad_accum == accum and accum_sum_factor(o, layout) == accum
    ds = build_deepspeed_config(o, cfg.parallel, cfg.precision, layout)
    assert ds["gradient_clipping"] == pytest.approx(5.0 / accum)


def test_weighted_datasets_mix_sample_by_sample(tmp_path):
    cfg = config(tmp_path, {
        "tasks": {"mlm": 2, "itm": 1},
        "data": {"datasets": [
            {"name": "coco", "train": "c/train", "val": "c/val", "weight": 1},
            {"name": "cc", "train": "cc/train", "weight": 3},
        ]}})
    by_key = {e.key: e for e in task_mix(cfg)}
    assert set(by_key) == {"mlm", "itm"} and by_key["mlm"].ratio == 2
    assert [(s.name, s.weight) for s in by_key["mlm"].sources] == [("coco", 1.0), ("cc", 3.0)]
    assert by_key["itm"].val_keys() == [("coco/itm", by_key["itm"].sources[0])]


@pytest.mark.parametrize("datasets,needle", [
    ([{"name": "a", "train": "t", "weight": 1}, {"name": "b", "train": "t"}], "every dataset a weight"),
    ([{"name": "a", "train": "t", "weight": 1, "tasks": {"mlm": 1}}], "not both"),
    ([{"name": "a", "train": "t", "weight": 0}], "not all be 0"),
    ([{"name": "a", "train": "t", "weight": -1}], "must be >= 0"),
])
def test_bad_weights_are_refused(tmp_path, datasets, needle):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, {"data": {"datasets": datasets}})
    assert needle in str(e.value)
