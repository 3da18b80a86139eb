"""`vlpt convert import/export`: UNITER file round trips and real DeepSpeed checkpoints."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from data.config import AlbefDataConfig, DataConfig
from data.pixels import PixelConfig
from trainer.checkpoint_files import save_tensors
from trainer.config import Config, config_to_yaml
from trainer.models.albef import Albef, AlbefTeacher
from trainer.models.config import AlbefConfig, ModelConfig
from trainer.models.convert import TIED_DUPLICATES, export_uniter_state_dict
from trainer.models.convert_albef import export_albef_state_dict, import_albef_state_dict
from trainer.models.pretrain import UniterForPretraining
from vlpt.cli import main

TINY = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   vocab_size=50, img_dim=16, img_label_dim=9)
TAG = "step_00000001"


def tiny_model(seed: int = 0) -> UniterForPretraining:
    torch.manual_seed(seed)
    return UniterForPretraining(TINY)


def assert_bit_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------- import


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_import_round_trip_is_bit_identical(tmp_path, capsys, suffix):
    model = tiny_model()
    uniter_sd = export_uniter_state_dict(model.state_dict())
    src, dst = tmp_path / "model_step_1000.pt", tmp_path / f"ours{suffix}"
    torch.save(uniter_sd, src)

    assert main(["convert", "import", "--src", str(src), "--dst", str(dst)]) == 0

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        got = load_file(str(dst))
    else:
        got = torch.load(dst, map_location="cpu", weights_only=True)
        assert list(got) == list(model.state_dict())  # UNITER's key order is kept
    assert_bit_identical(got, model.state_dict())
    line = one_line(capsys.readouterr().out)
    n = len(model.state_dict())
    assert f"{n + 2} keys in, {n} out" in line
    assert all(dup in line for dup in TIED_DUPLICATES)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_import_then_export_restores_the_uniter_file(tmp_path, suffix):
    uniter_sd = export_uniter_state_dict(tiny_model().state_dict())
    torch.save(uniter_sd, tmp_path / "uniter.pt")
    ours = str(tmp_path / f"ours{suffix}")
    assert main(["convert", "import", "--src", str(tmp_path / "uniter.pt"), "--dst", ours]) == 0
    assert main(["convert", "export", "--src", ours, "--dst", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", map_location="cpu", weights_only=True)
    assert list(back) == list(uniter_sd)
    assert_bit_identical(back, uniter_sd)


# ---------------------------------------------------------------- export from DeepSpeed checkpoints


@pytest.fixture(scope="module", params=[(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")],
                ids=["stage0", "stage2", "stage3", "stage0-bf16"])
def ds_run(request, process_group, tmp_path_factory):
    """A run dir with one DeepSpeed checkpoint and the model's weights at that point.

    Stages 0 and 2 take one optimizer step first, so the fp32 master copies must have followed
    the update; ZeRO-3 only computes gradients through the engine's forward (which needs a task
    batch), so its checkpoint holds the initial weights. The weights come back as fp32 (bf16
    ones upcast exactly).
    """
    deepspeed, (stage, dtype) = process_group, request.param
    model = tiny_model()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "bf16": {"enabled": dtype == "bf16"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # DeepSpeedEngine asserts it is set, as a launcher would
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    if stage < 3:
        engine.backward(sum((p ** 2).sum() for p in engine.module.parameters()))
        engine.step()
    run_dir = tmp_path_factory.mktemp(f"run_stage{stage}_{dtype}")
    root = run_dir / "checkpoints"
    engine.save_checkpoint(str(root), tag=TAG, save_latest=False)
    (root / "latest").write_text(TAG)
    (root / TAG / "config.yaml").write_text(config_to_yaml(Config(model=TINY)))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        want = {k: v.detach().float() for k, v in engine.module.state_dict().items()}
    initial = tiny_model().state_dict()["itm_output.weight"]
    moved = (want["itm_output.weight"] - initial).abs().max().item()  # Adam's first step: ~lr
    assert (moved > 5e-3) == (stage < 3)
    return stage, run_dir, want


@pytest.mark.parametrize("which", ["run_dir", "checkpoints_dir", "tag_dir"])
def test_export_from_deepspeed_checkpoint(ds_run, tmp_path, capsys, which):
    stage, run_dir, want = ds_run
    src = {"run_dir": run_dir, "checkpoints_dir": run_dir / "checkpoints",
           "tag_dir": run_dir / "checkpoints" / TAG}[which]
    dst = tmp_path / "uniter" / "model_step_1.pt"

    assert main(["convert", "export", "--src", str(src), "--dst", str(dst)]) == 0

    got = torch.load(dst, map_location="cpu", weights_only=True)
    expected = export_uniter_state_dict(want)
    assert list(got) == list(expected)
    assert_bit_identical(got, expected)
    line = one_line(capsys.readouterr().out)
    assert str(run_dir / "checkpoints" / TAG) in line and f"{len(expected)} keys" in line
    assert ("ZeRO" in line) == (stage > 0)


def test_export_rejects_checkpoint_that_does_not_fit_its_config(ds_run, tmp_path, capsys):
    _, run_dir, _ = ds_run
    tag_dir = tmp_path / TAG
    shutil.copytree(run_dir / "checkpoints" / TAG, tag_dir)
    wider = dataclasses.replace(TINY, hidden_size=64)
    (tag_dir / "config.yaml").write_text(config_to_yaml(Config(model=wider)))

    assert main(["convert", "export", "--src", str(tag_dir), "--dst", str(tmp_path / "out.pt")]) == 2
    assert str(tag_dir) in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out.pt").exists()


def test_export_reads_stage0_model_states_that_pickle_objects(tmp_path, capsys):
    """DeepSpeed's own model-states file may hold non-tensor objects (here its loss scaler)."""
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    model = tiny_model()
    tag_dir = tmp_path / "checkpoints" / TAG
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "optimizer": {"loss_scaler": loss_scaler.LossScaler(1.0)}},
               tag_dir / "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text(TAG + "\n")

    assert main(["convert", "export", "--src", str(tmp_path), "--dst", str(tmp_path / "out.pt")]) == 0
    assert_bit_identical(torch.load(tmp_path / "out.pt", weights_only=True),
                         export_uniter_state_dict(model.state_dict()))
    assert str(tag_dir) in one_line(capsys.readouterr().out)


# ---------------------------------------------------------------- user errors


def _error_case(tmp_path: Path, case: str) -> tuple[list[str], Path]:
    """argv tail and the path the one-line error must name."""
    if case == "import_missing_src":
        return ["import", "--src", str(tmp_path / "nope.pt")], tmp_path / "nope.pt"
    if case == "export_missing_src":
        return ["export", "--src", str(tmp_path / "nope")], tmp_path / "nope"
    if case == "dir_without_latest":
        (tmp_path / "run").mkdir()
        return ["export", "--src", str(tmp_path / "run")], tmp_path / "run"
    if case == "latest_names_missing_tag":
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
        return ["export", "--src", str(tmp_path)], tmp_path / "checkpoints" / "latest"
    if case == "not_a_state_dict":
        (tmp_path / "notes.pt").write_text("hello")
        return ["import", "--src", str(tmp_path / "notes.pt")], tmp_path / "notes.pt"
    if case == "pickled_object":
        torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
        return ["import", "--src", str(tmp_path / "pickled.pt")], tmp_path / "pickled.pt"
    if case == "not_uniter":
        torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
        return ["export", "--src", str(tmp_path / "other.pt")], tmp_path / "other.pt"
    if case == "untied_duplicate":
        sd = export_uniter_state_dict(tiny_model().state_dict())
        sd["feat_regress.weight"] = sd["feat_regress.weight"] + 1
        torch.save(sd, tmp_path / "untied.pt")
        return ["import", "--src", str(tmp_path / "untied.pt")], tmp_path / "untied.pt"
    if case == "export_already_uniter":
        torch.save(export_uniter_state_dict(tiny_model().state_dict()), tmp_path / "uniter.pt")
        return ["export", "--src", str(tmp_path / "uniter.pt")], tmp_path / "uniter.pt"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["import_missing_src", "export_missing_src", "dir_without_latest",
                                  "latest_names_missing_tag", "not_a_state_dict", "pickled_object",
                                  "not_uniter", "untied_duplicate", "export_already_uniter"])
def test_user_errors_are_one_line_naming_the_path(tmp_path, capsys, case):
    argv, named = _error_case(tmp_path, case)
    dst = tmp_path / "out.pt"

    assert main(["convert", *argv, "--dst", str(dst)]) == 2

    line = one_line(capsys.readouterr().err)
    assert line.startswith("vlpt: error: ") and str(named) in line
    assert not dst.exists()


# ---------------------------------------------------------------- ALBEF: export with ALBEF's names

TINY_ALBEF = AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=2,
                         fusion_layers=1, max_position_embeddings=40, vision_width=32, vision_layers=2,
                         vision_heads=2, vision_mlp=64, image_size=32, patch_size=16, embed_dim=16, queue_size=8)


def tiny_albef() -> tuple[Albef, AlbefTeacher]:
    """A student and a teacher that differs from it (as after EMA steps), with a moved queue pointer."""
    torch.manual_seed(0)
    student = Albef(TINY_ALBEF)
    teacher = AlbefTeacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
        teacher.queues.ptr.fill_(4)
    return student, teacher


def test_albef_export_uses_albefs_names_and_imports_back_equal():
    student, teacher = tiny_albef()
    out = export_albef_state_dict(student.state_dict(), teacher.state_dict())
    t = TINY_ALBEF.text_layers
    assert out["visual_encoder.blocks.1.attn.qkv.weight"].shape == (96, 32)  # q, k, v fused as timm's
    assert {"visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.norm.weight", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
            "visual_encoder_m.blocks.0.mlp.fc1.weight", "vision_proj_m.bias", "text_proj_m.weight",
            "text_encoder.bert.embeddings.word_embeddings.weight", "text_encoder.bert.embeddings.position_ids",
            f"text_encoder.bert.encoder.layer.{t}.crossattention.self.key.weight",
            "text_encoder.cls.predictions.decoder.weight", "text_encoder_m.cls.predictions.decoder.bias",
            f"text_encoder_m.bert.encoder.layer.{t - 1}.output.LayerNorm.bias"} <= set(out)
    assert not any(".fusion." in k or ".layers." in k or k.startswith("queues.") for k in out)
    assert out["temp"].shape == () and out["queue_ptr"].tolist() == [4] and out["queue_ptr"].dtype == torch.long
    assert out["image_queue"].shape == (TINY_ALBEF.embed_dim, TINY_ALBEF.queue_size)
    assert torch.equal(out["text_encoder.cls.predictions.decoder.weight"],
                       out["text_encoder.bert.embeddings.word_embeddings.weight"])

    got_student, got_teacher = import_albef_state_dict(out, list(student.visual_encoder.state_dict()))
    assert_bit_identical(got_student, student.state_dict())
    assert_bit_identical(got_teacher, teacher.state_dict())
    Albef(TINY_ALBEF).load_state_dict(got_student)  # strict: the import path loads it


def test_albef_import_refuses_tied_copies_that_differ():
    student, teacher = tiny_albef()
    out = export_albef_state_dict(student.state_dict(), teacher.state_dict())
    out["text_encoder.cls.predictions.decoder.weight"] = out["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="decoder.weight differs"):
        import_albef_state_dict(out, list(student.visual_encoder.state_dict()))


def test_export_of_an_albef_run_checkpoint(process_group, tmp_path, capsys):
    """`vlpt convert export` on an ALBEF run: checked against its config.yaml, teacher.pt included."""
    deepspeed = process_group
    student, teacher = tiny_albef()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")
        engine, *_ = deepspeed.initialize(model=student, config=config,
                                          optimizer=torch.optim.AdamW(student.parameters(), lr=1e-2))
    root = tmp_path / "run" / "checkpoints"
    engine.save_checkpoint(str(root), tag=TAG, save_latest=False)
    (root / "latest").write_text(TAG)
    save_tensors(teacher.state_dict(), str(root / TAG / "teacher.pt"))
    cfg = Config(model=TINY_ALBEF, tasks={"albef": 1.0},
                 data=DataConfig(max_txt_len=30, albef=AlbefDataConfig(pixels=PixelConfig(image_size=32))))
    (root / TAG / "config.yaml").write_text(config_to_yaml(cfg))
    dst = tmp_path / "albef.pth"

    assert main(["convert", "export", "--src", str(tmp_path / "run"), "--dst", str(dst)]) == 0
    line = one_line(capsys.readouterr().out)
    assert "student and momentum model" in line and "ALBEF names" in line
    got_student, got_teacher = import_albef_state_dict(torch.load(dst, map_location="cpu", weights_only=True),
                                                       list(student.visual_encoder.state_dict()))
    assert_bit_identical(got_student, {k: v.float() for k, v in engine.module.state_dict().items()})
    assert_bit_identical(got_teacher, teacher.state_dict())


def test_albef_retrieval_export_uses_the_names_of_albefs_retrieval_model():
    """A retrieval fine-tuning model (no MLM head, an image-index queue) -> `model_retrieval.ALBEF`'s names:
    its text encoders are BertModels (no `bert.` prefix, no `cls.*`), and `idx_queue` is [1, K]."""
    torch.manual_seed(0)
    student = Albef(TINY_ALBEF, mlm_head=False)
    teacher = AlbefTeacher(student, image_index_queue=True)
    with torch.no_grad():
        teacher.queues.idx_queue[:4] = torch.tensor([3, 9, 3, 1])
    out = export_albef_state_dict(student.state_dict(), teacher.state_dict())

    pretrain_student, pretrain_teacher = tiny_albef()  # the pretraining layout, tested above
    pretrain = export_albef_state_dict(pretrain_student.state_dict(), pretrain_teacher.state_dict())
    want = {k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m.")
            for k in pretrain if ".cls." not in k and not k.startswith(("text_encoder.cls.", "text_encoder_m.cls."))}
    assert set(out) == want | {"idx_queue"}
    t = TINY_ALBEF.text_layers
    assert {"text_encoder.embeddings.position_ids", f"text_encoder.encoder.layer.{t}.crossattention.self.value.bias",
            "text_encoder_m.embeddings.word_embeddings.weight"} <= set(out)
    assert out["idx_queue"].shape == (1, TINY_ALBEF.queue_size) and out["idx_queue"].dtype == torch.long
    assert out["idx_queue"][0, :5].tolist() == [3, 9, 3, 1, -100]

    got_student, got_teacher = import_albef_state_dict(out, list(student.visual_encoder.state_dict()))
    assert_bit_identical(got_student, student.state_dict())
    assert_bit_identical(got_teacher, teacher.state_dict())


def test_a_teacher_file_that_is_not_a_state_dict_is_one_line(tmp_path):
    from trainer.config_files import ConfigError
    from trainer.models.convert_cli import read_teacher

    assert read_teacher(tmp_path) is None  # no teacher.pt: a UNITER run, or a student-only checkpoint
    save_tensors({"queues.ptr": [1, 2]}, str(tmp_path / "teacher.pt"))
    with pytest.raises(ConfigError, match="teacher.pt is not a state dict"):
        read_teacher(tmp_path)


def test_the_model_entry_of_a_training_checkpoint_is_read(tmp_path):
    """ALBEF's ALBEF.pth is `{'model': state dict, 'optimizer': ..., 'config': ..., 'epoch': ...}`."""
    from trainer.models.convert_cli import load_state_dict_file

    student, _ = tiny_albef()
    sd = export_albef_state_dict(student.state_dict(), None)
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "config": {"lr": 1e-4}, "epoch": 29},
               path)
    assert_bit_identical(load_state_dict_file(path), sd)


def test_albef_ve_export_uses_the_names_of_albefs_ve_model():
    """ALBEF's `model_ve`: visual_encoder, text_encoder (a BertModel), cls_head, and their `_m` copies."""
    from trainer.models.albef_classifier import AlbefClassifier, MomentumCopy

    torch.manual_seed(0)
    student = AlbefClassifier(TINY_ALBEF, 3)
    teacher = MomentumCopy(student)
    out = export_albef_state_dict(student.state_dict(), teacher.state_dict())
    tops = {k.split(".")[0] for k in out}
    assert tops == {"visual_encoder", "text_encoder", "cls_head", "visual_encoder_m", "text_encoder_m", "cls_head_m"}
    assert {"cls_head.0.weight", "cls_head_m.2.bias", "text_encoder.embeddings.position_ids",
            f"text_encoder_m.encoder.layer.{TINY_ALBEF.text_layers}.crossattention.self.key.weight"} <= set(out)
    assert torch.equal(out["cls_head_m.2.weight"], teacher.model.cls_head[2].weight)
    got_student, got_teacher = import_albef_state_dict(out, list(student.visual_encoder.state_dict()))
    assert_bit_identical(got_student, student.state_dict())  # ALBEF's VE files load back (vlpt evaluate)
    assert_bit_identical({f"model.{k}": v for k, v in got_teacher.items()}, teacher.state_dict())
