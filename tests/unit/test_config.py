"""Config flow: YAML + include → typed frozen dataclasses → dotted overrides."""
import dataclasses
import re

import pytest

from trainer.config import MOVED_KEYS, Config, load_config
from trainer.config_files import ConfigError
from trainer.config_loader import flatten, parse_override, to_dict


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def test_include_merges_depth_first_and_including_file_wins(tmp_path):
    write(tmp_path, "model/m.yaml", "model:\n  hidden_size: 32\n  num_attention_heads: 2\n  intermediate_size: 64\n")
    write(tmp_path, "base.yaml", "include: [model/m.yaml]\noptim:\n  lr: 1.0e-3\n")
    top = write(tmp_path, "top.yaml", "include: base.yaml\nmodel:\n  num_hidden_layers: 2\n")
    cfg = load_config(top)
    assert cfg.model.hidden_size == 32 and cfg.model.num_hidden_layers == 2
    assert cfg.optim.lr == 1e-3
    assert cfg.model.vocab_size == 28996  # untouched default


def test_overrides_are_typed(tmp_path):
    top = write(tmp_path, "c.yaml", "train:\n  max_steps: 10\n")
    cfg = load_config(top, ["--optim.lr=1e-4", "--train.max_steps=20", "--optim.betas=[0.9, 0.999]",
                            "--tasks.mlm=3", "--train.progress=false"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 20
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.tasks["mlm"] == 3.0
    assert cfg.train.progress is False


def test_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "{}"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


@pytest.mark.parametrize("text,needle", [
    ("model:\n  hiden_size: 3\n", "model.hiden_size"),
    ("optim:\n  lr: 1e-4\n  bogus: 1\n", "optim.bogus"),
    ("nosuchsection: {}\n", "nosuchsection"),
])
def test_unknown_key_names_full_path(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(write(tmp_path, "c.yaml", text))


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config(write(tmp_path, "c.yaml", "model:\n  hiden_size: 3\n"))


@pytest.mark.parametrize("override,needle", [
    ("--train.max_steps=abc", "train.max_steps"),
    ("--optim.lr=true", "optim.lr"),
    ("--train.progress=1", "train.progress"),
    ("--precision.dtype=fp8", "precision.dtype"),
    ("--parallel.zero_stage=4", "zero_stage"),
    ("--model.hidden_size=1.5", "model.hidden_size"),
    ("--train.max_consecutive_nonfinite=0", "max_consecutive_nonfinite"),
    ("--train.checkpoint_s3=bucket/prefix", "checkpoint_s3"),
])
def test_wrongly_typed_override(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(write(tmp_path, "c.yaml", "{}"), [override])


def test_missing_file_and_missing_include(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    top = write(tmp_path, "c.yaml", "include: [gone.yaml]\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(top)


def test_include_cycle(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_override("--optim.lr")


def test_round_trip_and_flatten(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "{}"), ["--optim.lr=2e-4"])
    tree = to_dict(cfg)
    again = load_config(write(tmp_path, "d.yaml", __import__("yaml").safe_dump(tree)))
    assert again == cfg
    flat = flatten(tree)
    assert flat["optim.lr"] == 2e-4 and flat["model.hidden_size"] == 768


def test_shipped_configs_load():
    import glob
    for path in glob.glob("configs/pretrain/*.yaml"):
        assert isinstance(load_config(path), Config)


def test_url_with_a_password_is_refused_by_any_config_load(tmp_path):
    """The resolved config is printed, saved beside checkpoints and logged as MLflow params."""
    path = write(tmp_path, "c.yaml", "tracking:\n  uri: http://me:hunter2@mlflow:5000\n")
    with pytest.raises(ConfigError, match="tracking.uri carries a password") as e:
        load_config(path)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="storage.s3.endpoint_url"):
        load_config(write(tmp_path, "d.yaml", "{}"), ["--storage.s3.endpoint_url=http://a:b@minio:9000"])
    plain = write(tmp_path, "e.yaml", "tracking:\n  uri: http://mlflow:5000\n")
    assert load_config(plain).tracking.uri == "http://mlflow:5000"


def test_model_arch_picks_the_section_type(tmp_path):
    from trainer.models.config import AlbefConfig, ModelConfig

    assert isinstance(load_config(write(tmp_path, "u.yaml", "model:\n  hidden_size: 64\n  num_attention_heads: 4\n")).model,
                      ModelConfig)
    cfg = load_config("configs/pretrain/demo-albef.yaml", ["--model.k_test=8"])
    assert isinstance(cfg.model, AlbefConfig) and cfg.model.k_test == 8 and cfg.tasks == {"albef": 1.0}
    assert load_config(write(tmp_path, "r.yaml", config_to_yaml_text(cfg))) == cfg  # the saved config reloads


def config_to_yaml_text(cfg) -> str:
    from trainer.config import config_to_yaml

    return config_to_yaml(cfg)


@pytest.mark.parametrize("overrides, needle", [
    (["--model.arch=clip"], "model.arch='clip' is not a known model family; known: albef, uniter"),
    (["--model.img_dim=16"], "unknown config key 'model.img_dim'"),  # a UNITER key in an ALBEF section
    (["--tasks={mlm: 1}"], "unknown task 'mlm' in tasks; model.arch's tasks are albef"),
    (["--data.albef.pixels.image_size=64"], "data.albef.pixels.image_size=64 must equal model.image_size=96"),
    (["--data.uniter.token_budget=4096"], "data.uniter.token_budget"),
    (["--model.image_size=100"], "multiple of model.patch_size"),
    (["--model.momentum=1.0"], "model.momentum in [0, 1)"),
])
def test_bad_albef_configs_are_refused_with_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("configs/pretrain/demo-albef.yaml", overrides)


def test_the_albef_task_needs_the_albef_model(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("unknown task 'albef' in tasks; model.arch's tasks are mlm, itm,")):
        load_config(write(tmp_path, "c.yaml", "tasks:\n  albef: 1\n"))


# A value each moved key's new place takes: (the part below the key, the value); "" = the key itself.
MOVED_EXAMPLES = {
    "data.s3": ("endpoint_url", "http://minio:9000"),
    "data.pixels": ("image_size", 64),
    "data.mrm_prob": ("", 0.2),
    "data.itm_neg_prob": ("", 0.25),
    "data.itm_hard_candidates": ("", 5),
    "data.token_budget": ("", 4096),
    "data.vocab": ("", "/models/bert-base-cased/vocab.txt"),
}


@pytest.mark.parametrize("form", ["yaml", "override"])
@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_a_moved_key_is_refused_with_one_line_naming_its_new_place(tmp_path, old, form):
    import yaml

    new = MOVED_KEYS[old]
    below, value = MOVED_EXAMPLES[old]  # a KeyError here: give the newly moved key an example
    old_key, new_key = (f"{old}.{below}", f"{new}.{below}") if below else (old, new)
    if form == "yaml":
        tree: dict = {}
        node = tree
        *parents, leaf = old_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        path, overrides = write(tmp_path, "c.yaml", yaml.safe_dump(tree)), []
    else:
        path, overrides = write(tmp_path, "c.yaml", "{}"), [f"--{old_key}={value}"]
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert f"config key '{old}' has moved: use '{new}'" in message
    # The new key takes the same value.
    cfg = load_config(write(tmp_path, "ok.yaml", "{}"), [f"--{new_key}={value}"])
    got = cfg
    for part in new_key.split("."):
        got = getattr(got, part)
    assert got == value


def test_train_compile_is_off_by_default_and_takes_a_bool(tmp_path):
    import glob

    path = write(tmp_path, "c.yaml", "{}")
    assert load_config(path).train.compile is False
    assert all(load_config(p).train.compile is False for p in glob.glob("configs/pretrain/*.yaml"))
    assert load_config(path, ["--train.compile=true"]).train.compile is True
    assert load_config(write(tmp_path, "on.yaml", "train:\n  compile: on\n")).train.compile is True  # YAML 1.1
    with pytest.raises(ConfigError, match=re.escape("train.compile: expected bool, got 'layers'")):
        load_config(path, ["--train.compile=layers"])


def test_train_compile_under_zero3_is_refused_with_the_fix(tmp_path):
    path = write(tmp_path, "c.yaml", "{}")
    with pytest.raises(ConfigError, match=re.escape("train.compile needs parallel.zero_stage <= 2")) as e:
        load_config(path, ["--train.compile=true", "--parallel.zero_stage=3"])
    assert "set parallel.zero_stage=2 or train.compile=false" in str(e.value)
    assert load_config(path, ["--train.compile=true", "--parallel.zero_stage=2"]).train.compile is True
    assert load_config("configs/pretrain/demo-albef.yaml", ["--train.compile=true"]).train.compile is True


# ---------------------------------------------------------------- run names and resume modes


def test_run_dir_defaults_to_the_config_name_and_stays_cwd_relative(tmp_path):
    top = write(tmp_path, "sub/my-run.yaml", "train:\n  max_steps: 10\n")
    assert load_config(top).train.run_dir == "runs/my-run"  # no timestamp: the same command, the same run
    named = write(tmp_path, "sub/named.yaml", "train:\n  run_dir: runs/x\n")
    assert load_config(named).train.run_dir == "runs/x"  # not made relative to the file
    assert load_config(named, ["--train.run_dir=elsewhere"]).train.run_dir == "elsewhere"


@pytest.mark.parametrize("value, mode", [("auto", "auto"), ("never", "never"), ("must", "must"),
                                         ("true", "auto"), ("false", "never")])
def test_resume_modes_and_the_old_booleans(tmp_path, value, mode):
    top = write(tmp_path, "c.yaml", f"train:\n  resume: {value}\n")
    assert load_config(top).train.resume == mode
    assert load_config(write(tmp_path, "d.yaml", ""), [f"--train.resume={value}"]).train.resume == mode


def test_resume_bad_values_are_one_line(tmp_path):
    top = write(tmp_path, "c.yaml", "train:\n  resume: sometimes\n")
    with pytest.raises(ConfigError, match=r"train.resume: 'sometimes' is not one of \['auto', 'never', 'must'\]"):
        load_config(top)
    with pytest.raises(ConfigError, match=r"can never resume"):
        load_config(top, ["--train.resume=must", "--train.run_dir=runs/x-{now}"])


# ---------------------------------------------------------------- choice sets: replaced, not merged


def test_a_later_files_tasks_replace_the_set_and_an_override_sets_one_weight(tmp_path):
    write(tmp_path, "base.yaml", "tasks: {mlm: 2, itm: 5, mrc-kl: 1}\noptim: {lr: 1.0e-3, warmup_steps: 3}\n")
    top = write(tmp_path, "top.yaml", "include: base.yaml\ntasks: {mlm: 1, itm: 1, mrfr: 1}\noptim: {lr: 2.0e-3}\n")
    cfg = load_config(top)
    assert cfg.tasks == {"mlm": 1.0, "itm": 1.0, "mrfr": 1.0}  # mrc-kl left out: gone
    assert cfg.optim.lr == 2e-3 and cfg.optim.warmup_steps == 3  # other sections still merge
    assert load_config(top, ["--tasks.mlm=4"]).tasks == {"mlm": 4.0, "itm": 1.0, "mrfr": 1.0}
    assert load_config(top, ["--tasks={itm: 1}"]).tasks == {"itm": 1.0}
    inherit = write(tmp_path, "inherit.yaml", "include: base.yaml\noptim: {lr: 2.0e-3}\n")
    assert load_config(inherit).tasks == {"mlm": 2.0, "itm": 5.0, "mrc-kl": 1.0}  # not named: inherited


# ---------------------------------------------------------------- paths: relative to the file naming them


def test_paths_resolve_against_the_file_that_names_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "configs/data/d.yaml",
          "data:\n  train: ../../shards/train\n  tokenizer: {path: vocab.txt, lowercase: false}\n")
    top = write(tmp_path, "configs/run/r.yaml",
                "include: ../data/d.yaml\ndata:\n  val: held/out\n  datasets:\n"
                "    - {name: a, train: a/train, val: s3://bucket/a/val}\n    - {name: b, train: /abs/b}\n")
    cfg = load_config(top)
    assert cfg.data.train == str(tmp_path / "shards/train")
    assert cfg.data.tokenizer.path == str(tmp_path / "configs/data/vocab.txt")  # the included file's folder
    assert cfg.data.val == str(tmp_path / "configs/run/held/out")
    assert [(d.train, d.val) for d in cfg.data.datasets] == [
        (str(tmp_path / "configs/run/a/train"), "s3://bucket/a/val"), ("/abs/b", None)]
    over = load_config(top, ["--data.tokenizer.path=mine/v.txt", "--data.train=s3://b/t"])
    assert over.data.tokenizer.path == str(tmp_path / "mine/v.txt") and over.data.train == "s3://b/t"  # cwd-relative


def test_path_keys_are_one_list_of_existing_keys():
    from trainer.config_files import PATH_KEYS
    from trainer.models.config import AlbefConfig, ModelConfig

    known = set(flatten(to_dict(Config()))) | {f"model.{k}" for k in to_dict(AlbefConfig())}
    for key in PATH_KEYS:
        if "[]" in key:
            assert key.split("[]")[0] in known
        else:
            assert key in known, key
    assert ModelConfig  # the UNITER section is Config()'s default model


def test_resume_mode_checks_the_run_dir_before_touching_it(tmp_path):
    from trainer.run_dir import check_resume_mode

    run_dir = tmp_path / "runs" / "x"
    check_resume_mode(str(run_dir), "auto", None)
    check_resume_mode(str(run_dir), "never", None)
    with pytest.raises(ConfigError, match="train.resume is must but train.run_dir=.* holds no checkpoint"):
        check_resume_mode(str(run_dir), "must", None)
    check_resume_mode(str(run_dir), "must", "s3://bucket/run")  # the upload is looked for when fetched
    assert not run_dir.exists()
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
    check_resume_mode(str(run_dir), "auto", None)
    check_resume_mode(str(run_dir), "must", None)
    with pytest.raises(ConfigError, match=r"\(step_00000002\) and train.resume is never; use a new name"):
        check_resume_mode(str(run_dir), "never", None)


def test_a_missing_file_names_the_key_the_value_as_written_and_the_resolved_path(tmp_path):
    from trainer.run_setup import check_inputs

    top = write(tmp_path, "configs/x.yaml",
                "data:\n  train: ../demo_data/train\n  tokenizer: {path: vocab/v.txt, lowercase: false}\n")
    (tmp_path / "demo_data/train").mkdir(parents=True)
    (tmp_path / "demo_data/train/manifest.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        check_inputs(load_config(top))
    assert str(e.value) == (f"data.tokenizer.path: file not found: {tmp_path}/configs/vocab/v.txt (written "
                            f"'vocab/v.txt' in {top}, whose folder a config file's paths are relative to)")
    (tmp_path / "configs/vocab").mkdir()
    (tmp_path / "configs/vocab/v.txt").write_text("[PAD]\n")
    with_val = write(tmp_path, "configs/y.yaml", "include: x.yaml\ndata:\n  val: ../demo_data/val\n")
    with pytest.raises(ConfigError, match=r"data.val: file not found: /\S+/demo_data/val/manifest.json \(written "
                                          r"'../demo_data/val' in .*y.yaml, .*\) \(make the demo shards"):
        check_inputs(load_config(with_val))
