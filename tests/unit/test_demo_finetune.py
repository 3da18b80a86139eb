"""`vlpt demo-finetune`'s run order (trainer/demo_finetune.py): a task with a preparing step runs that step from
the same start first, and starts from its run."""
from trainer import demo_finetune


def test_nlvr2_runs_after_text_assignment_from_the_same_start_in_both_columns(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(config, overrides, run_dir, from_scratch, start=None):
        calls.append((config.rsplit("/", 1)[-1], run_dir.rsplit("/", 1)[-1], from_scratch,
                      start and start.rsplit("/", 1)[-1]))
        return {"nlvr2_acc": 0.6 if not from_scratch and start == f"{tmp_path}/nlvr2-ta" else 0.5}, None

    monkeypatch.setattr(demo_finetune, "run_one", fake_run_one)
    rows = demo_finetune._runs(demo_finetune.FAMILIES["albef"], "configs/finetune", str(tmp_path), ("nlvr2", "ve"),
                               ("--x=1",))
    assert calls == [
        ("demo-albef-ta.yaml", "nlvr2-ta", False, None),
        ("demo-albef-nlvr2.yaml", "nlvr2", False, "nlvr2-ta"),
        ("demo-albef-ta.yaml", "nlvr2-scratch-ta", True, None),
        ("demo-albef-nlvr2.yaml", "nlvr2-scratch", False, "nlvr2-scratch-ta"),
        ("demo-albef-ve.yaml", "ve", False, None),
        ("demo-albef-ve.yaml", "ve-scratch", True, None),
    ]
    assert (rows[0]["pretrained"], rows[0]["scratch"]) == (0.6, 0.5)
    assert demo_finetune.FAMILIES["uniter"].prepared_by == {}


def test_run_one_starts_from_the_named_run_or_from_scratch(monkeypatch):
    seen = []
    monkeypatch.setattr(demo_finetune, "load_config", lambda config, extra: seen.append(extra) or _Cfg())
    monkeypatch.setattr("trainer.run.pretrain", lambda cfg: {"val/x": 1.0, "loss": 2.0})
    assert demo_finetune.run_one("c.yaml", ["--a=1"], "r", from_scratch=False) == ({"x": 1.0}, "v")
    demo_finetune.run_one("c.yaml", [], "r", from_scratch=True)
    demo_finetune.run_one("c.yaml", [], "r", from_scratch=False, start="runs/ta")
    assert seen == [["--train.run_dir=r", "--a=1"], ["--train.run_dir=r", "--finetune.init_from=null"],
                    ["--train.run_dir=r", "--finetune.init_from=runs/ta"]]


class _Cfg:
    class finetune:
        val = "v"
