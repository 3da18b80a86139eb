"""`vlpt demo-vit`: the pixel demo's stand-in for ALBEF's DeiT (trainer/demo_vit.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from data.demo_scenes import DemoScene
from trainer.demo_vit import OBJECT_CLASSES, DemoVitSettings, patch_targets, train_demo_vit
from trainer.models.albef import vision_transformer
from trainer.models.albef_init import load_vit_directory
from trainer.models.config import AlbefConfig
from vlpt.cli import main

TINY = AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1,
                   fusion_layers=1, max_position_embeddings=16, vision_width=32, vision_layers=1, vision_heads=2,
                   vision_mlp=64, image_size=32, patch_size=8, embed_dim=8, queue_size=6)
FEW = DemoVitSettings(scenes=10, held_out=2, steps=3, batch_size=4, warmup_steps=1)


def scene(objects, boxes) -> DemoScene:
    n = len(objects)
    bb = np.array([[x1, y1, x2, y2, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes], dtype=np.float32)
    return DemoScene("s", list(objects), np.zeros((n, 4), np.float16), bb, np.linspace(1.0, 0.5, n).astype(np.float32),
                     np.zeros((n, 9), np.float16), [])


def test_each_patch_is_named_by_the_object_drawn_last_over_its_centre():
    # a 4x4 grid: patch centres at 1/8, 3/8, 5/8, 7/8
    s = scene([(1, 2), (3, 0), None], [(0.0, 0.0, 0.5, 0.5), (0.3, 0.3, 0.8, 0.8), (0.0, 0.0, 1.0, 1.0)])
    patches, present = patch_targets(s, 4)
    ball_red, cyl_red = 1 + 1 * 8 + 2, 1 + 3 * 8 + 0
    want = np.zeros((4, 4), dtype=np.int64)
    want[0:2, 0:2] = ball_red
    want[1:3, 1:3] = cyl_red  # drawn after the first object: on top where they overlap
    assert patches.tolist() == want.reshape(-1).tolist()  # row-major: row = y, column = x
    assert present.shape == (OBJECT_CLASSES,) and np.flatnonzero(present).tolist() == [ball_red - 1, cyl_red - 1]


def test_an_object_counts_once_even_with_two_proposals():
    s = scene([(0, 0), (0, 0)], [(0.0, 0.0, 0.3, 0.3), (0.6, 0.6, 1.0, 1.0)])  # the more confident one is drawn
    patches, present = patch_targets(s, 4)
    assert sorted(set(patches.tolist())) == [0, 1] and patches[0] == 1 and patches[-1] == 0
    assert present.sum() == 1


def test_the_trained_vit_loads_through_init_from_vit_and_is_reproducible(tmp_path):
    a = train_demo_vit(TINY, str(tmp_path / "a"), FEW)
    train_demo_vit(TINY, str(tmp_path / "b"), FEW)
    assert json.loads((tmp_path / "a" / "demo_vit.json").read_text()) == a
    assert a["settings"] == dataclasses.asdict(FEW) and 0 <= a["object_patch_acc"] <= 1
    assert a["object_patch_chance"] == round(1 / 65, 4)
    vits = []
    for d in ("a", "b"):
        vit = vision_transformer(TINY)
        assert load_vit_directory(vit, tmp_path / d) == []  # every tensor from the file, nothing left over
        vits.append(vit.state_dict())
    fresh = vision_transformer(TINY).state_dict()
    for k, v in vits[0].items():
        assert torch.equal(v, vits[1][k]), k  # the same settings: the same weights
    trained = [k for k, v in vits[0].items() if not torch.equal(v, fresh[k])]
    assert "embeddings.patch_embeddings.projection.weight" in trained


@pytest.mark.parametrize("settings, needle", [
    (dict(scenes=10, held_out=10), "more scenes"),
    (dict(held_out=0), "at least one held out"),
    (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr > 0"),
])
def test_bad_settings_are_refused(settings, needle):
    with pytest.raises(ValueError, match=needle):
        DemoVitSettings(**settings)


def test_the_command_refuses_a_uniter_config_and_a_config_without_a_target(tmp_path, capsys):
    assert main(["demo-vit", "--config", "configs/pretrain/demo.yaml", "--out", str(tmp_path / "v")]) == 2
    assert "trains an ALBEF image encoder" in capsys.readouterr().err
    assert main(["demo-vit", "--config", "configs/finetune/demo-albef-ve.yaml"]) == 2
    assert "pass --out" in capsys.readouterr().err
    assert main(["demo-vit", "--out", str(tmp_path / "v"), "--scenes", "100"]) == 2
    assert "more scenes (100) than held-out scenes (500)" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_the_command_keeps_an_existing_vit_unless_forced(tmp_path, capsys):
    out = tmp_path / "vit"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["demo-vit", "--out", str(out)]) == 0
    assert "already holds a ViT" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
