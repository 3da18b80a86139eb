"""ALBEF NLVR2's pieces (docs/downstream.md, "ALBEF NLVR2") against values computed here: the text-assignment
draws and loss, the partners' weights, the two-image encoder (alternating pictures, shared key/value), the
fusion-layer doubling a pretraining checkpoint is loaded through, the batch, and the export names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.collate_albef import collate_albef_nlvr2, pre_caption
from data.pixels import PixelConfig, eval_pixels
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from trainer.models.albef import Albef
from trainer.models.albef_classifier import AlbefClassifier, TextAssignment
from trainer.models.albef_finetune_load import load_into, two_image_layers
from trainer.models.bert import extended_attention_mask
from trainer.models.convert_albef import export_albef_state_dict, import_albef_state_dict
from trainer.objectives.albef import text_assignment_draws
from trainer.recipes.albef_nlvr2 import NOT_IN_NLVR2
from trainer.recipes.albef_ta import NEW as TA_NEW, NOT_IN_TA, ta_losses
from tests.unit.test_albef_ve import TINY

TWO = TINY.__class__(**{**TINY.__dict__, "fusion_layers": 2})
"""Two fusion layers in pretraining: the two-image encoder has four, pairs (0, 1) and (2, 3)."""


def draws(weights: torch.Tensor, n: int) -> list[tuple[torch.Tensor, ...]]:
    return [text_assignment_draws(weights, torch.Generator().manual_seed(s)) for s in range(n)]


def test_text_assignment_pairs_match_their_labels_and_never_repeat_a_picture():
    b = 5
    weights = torch.softmax(torch.randn(b, b, generator=torch.Generator().manual_seed(1)), 1).fill_diagonal_(0)
    counts = np.zeros(3)
    for left, right, labels in draws(weights, 3000):
        own = torch.arange(b)
        assert bool((left != right).all())
        assert bool((left[labels == 0] == own[labels == 0]).all())
        assert bool((right[labels == 1] == own[labels == 1]).all())
        neither = labels == 2
        assert not bool(((left == own) | (right == own))[neither].any())
        assert not bool(((left != own) & (right != own))[~neither].any())
        counts += np.bincount(labels.numpy(), minlength=3)
    share = counts / counts.sum()  # 1/3 each: 2/3 pairs with the caption's picture, half on each side
    assert share == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.015)


def test_partners_follow_the_weights_row():
    b = 4
    weights = torch.full((b, b), 0.02)
    weights[torch.arange(b), (torch.arange(b) + 1) % b] = 0.94  # picture i's likely partner: i + 1
    weights.fill_diagonal_(0)
    hits, total = 0, 0
    for left, right, labels in draws(weights, 2000):
        pair = labels < 2
        partner = torch.where(labels == 0, right, left)[pair]
        hits += int((partner == (torch.arange(b)[pair] + 1) % b).sum())
        total += int(pair.sum())
    assert hits / total == pytest.approx(0.94 / 0.98, abs=0.02)


def test_fewer_than_three_pictures_is_a_clear_error():
    with pytest.raises(ValueError, match="data.micro_batch_size"):
        text_assignment_draws(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.Generator())


def test_two_image_encoder_shares_key_and_value_within_each_pair_only():
    model = AlbefClassifier(TWO, 2, images=2)
    layers = [f.crossattention.self for f in model.text_encoder.fusion]
    assert len(layers) == 4
    for a, b in ((0, 1), (2, 3)):
        assert layers[a].key.weight is layers[b].key.weight and layers[a].value.bias is layers[b].value.bias
        assert layers[a].query.weight is not layers[b].query.weight
    assert layers[1].key.weight is not layers[2].key.weight
    names = list(model.state_dict())  # both names stay (ALBEF's checkpoints have both)
    assert "text_encoder.fusion.0.crossattention.self.key.weight" in names
    assert "text_encoder.fusion.1.crossattention.self.key.weight" in names


def test_fusion_layers_alternate_left_and_right_pictures():
    torch.manual_seed(0)
    model = AlbefClassifier(TWO, 2, images=2).eval()
    g = torch.Generator().manual_seed(2)
    batch = {"pixels": torch.randn(6, 3, 32, 32, generator=g), "input_ids": torch.randint(0, 50, (3, 5), generator=g),
             "attn_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])}
    with torch.no_grad():
        image = model.visual_encoder(pixel_values=batch["pixels"]).last_hidden_state
        left, right = image[:3], image[3:]
        hidden = model.text_encoder.text(batch["input_ids"], batch["attn_mask"])
        mask = extended_attention_mask(batch["attn_mask"], hidden.dtype)
        for k, layer in enumerate(model.text_encoder.fusion):  # by hand: layer k reads picture k mod 2
            hidden = layer(hidden, mask, left if k % 2 == 0 else right)
        want = model.cls_head(hidden[:, 0])
        got = model.logits(batch)
        swapped = model.logits({**batch, "pixels": torch.cat([batch["pixels"][3:], batch["pixels"][:3]])})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, swapped)


def pretraining_student() -> dict:
    torch.manual_seed(3)
    return Albef(TWO).state_dict()


def test_a_pretraining_fusion_layer_seeds_both_layers_of_its_pair():
    source = pretraining_student()
    model = AlbefClassifier(TWO, 2, images=2)
    adapted = two_image_layers(TWO.fusion_layers)(source, "test")
    dropped = load_into(model, adapted, "test", new=("cls_head.",), dropped=NOT_IN_NLVR2)
    assert dropped and all(k.startswith(NOT_IN_NLVR2) for k in dropped)
    got = model.state_dict()
    for k in range(2):
        for copy in (2 * k, 2 * k + 1):
            for part in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.bias"):
                assert torch.equal(got[f"text_encoder.fusion.{copy}.{part}"], source[f"text_encoder.fusion.{k}.{part}"])


def test_a_two_image_source_is_kept_and_a_missing_twin_filled_in():
    model = AlbefClassifier(TWO, 2, images=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["text_encoder.fusion.0.crossattention.self.value.bias"]  # a checkpoint that stored one name of the pair
    adapted = two_image_layers(TWO.fusion_layers)(sd, "test")
    assert torch.equal(adapted["text_encoder.fusion.0.crossattention.self.value.bias"],
                       sd["text_encoder.fusion.1.crossattention.self.value.bias"])
    assert adapted.keys() == model.state_dict().keys()
    three = {k.replace("fusion.3.", "fusion.9."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"fusion layers \[0, 1, 2, 9\]; NLVR2 reads a one-image model "
                                         r"\(2 fusion layers\) or a two-image one \(4\)"):
        two_image_layers(TWO.fusion_layers)(three, "init")


def test_text_assignment_model_loads_a_pretraining_checkpoint_with_a_new_frozen_projection_read():
    source = pretraining_student()
    model = TextAssignment(TWO)
    load_into(model, two_image_layers(2)(source, "test"), "test", new=TA_NEW, dropped=NOT_IN_TA)
    assert torch.equal(model.vision_proj.weight, source["vision_proj.weight"])
    assert not model.vision_proj.weight.requires_grad  # ALBEF reads it without gradient: never trained
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vision_proj."))


def test_partner_weights_are_the_softmax_of_picture_similarities_over_0_07():
    torch.manual_seed(4)
    model = TextAssignment(TWO)
    image = torch.randn(4, 5, 32)
    feat = F.normalize(image[:, 0] @ model.vision_proj.weight.t() + model.vision_proj.bias, dim=-1)
    want = torch.softmax(feat @ feat.t() / 0.07, 1)
    want.fill_diagonal_(0)
    torch.testing.assert_close(model.partner_weights(image), want)


def test_random_negatives_make_text_assignment_partners_uniform():
    model = TextAssignment(TINY.__class__(**{**TWO.__dict__, "itm_negatives": "random"}))
    want = torch.full((4, 4), 0.25).fill_diagonal_(0)
    torch.testing.assert_close(model.partner_weights(torch.randn(4, 5, 32)), want)


def test_text_assignment_loss_is_the_summed_ce_of_the_drawn_pairs():
    torch.manual_seed(5)
    model = TextAssignment(TWO).eval()
    g = torch.Generator().manual_seed(6)
    batch = {"pixels": torch.randn(4, 3, 32, 32, generator=g), "input_ids": torch.randint(0, 50, (4, 6), generator=g),
             "attn_mask": torch.ones(4, 6, dtype=torch.long)}
    result = ta_losses(model, batch, seed=11)
    image = model.image_tokens(batch["pixels"])
    left, right, labels = text_assignment_draws(model.partner_weights(image), torch.Generator().manual_seed(11))
    hidden = model.text_encoder.text(batch["input_ids"], batch["attn_mask"])
    mask = extended_attention_mask(batch["attn_mask"], hidden.dtype)
    for k, layer in enumerate(model.text_encoder.fusion):
        hidden = layer(hidden, mask, image[left] if k % 2 == 0 else image[right])
    logits = model.ta_head(hidden[:, 0])
    want = -torch.log_softmax(logits, -1)[torch.arange(4), labels].sum()
    torch.testing.assert_close(result.losses["loss"], want)
    result.losses["loss"].backward()
    assert model.ta_head.weight.grad is not None and model.vision_proj.weight.grad is None
    shared = model.text_encoder.fusion[0].crossattention.self.key.weight
    assert shared.grad is not None and shared.grad.abs().sum() > 0


def test_nlvr2_batch_puts_left_pictures_first_and_never_mirrors_the_statement():
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    examples = [({"id": "a", "image_ids": ["p0", "p1"], "text": "The left image has more red objects.", "label": 1},
                 [pics[0], pics[1]]),
                ({"id": "b", "image_ids": ["p2", "p3"], "text": "both images contain a cube", "label": 0},
                 [pics[2], pics[3]])]
    pixels = PixelConfig(image_size=32, hflip_prob=1.0)  # every training picture mirrored
    evaluation = collate_albef_nlvr2(examples, rng, tok, pixels, 30, train=False)
    want = torch.stack([eval_pixels(p, pixels) for p in (pics[0], pics[2], pics[1], pics[3])])
    assert torch.equal(evaluation["pixels"], want) and evaluation["labels"].tolist() == [1, 0]
    train = collate_albef_nlvr2(examples, rng, tok, pixels, 30)
    assert train["pixels"].shape == (4, 3, 32, 32)
    text = pre_caption("The left image has more red objects.")
    assert text == "the left image has more red objects"
    assert train["input_ids"][0, 1:int(train["attn_mask"][0].sum())].tolist() == tok.encode(text)
    unlabelled = collate_albef_nlvr2([({"id": "c", "text": "x"}, [pics[0], pics[1]])], rng, tok, pixels, 30)
    assert unlabelled["labels"].tolist() == [-100]


def test_export_names_are_albefs_nlvr2_and_text_assignment_models_and_import_back():
    nlvr2 = {k: v.clone() for k, v in AlbefClassifier(TWO, 2, images=2).state_dict().items()}
    out = export_albef_state_dict(nlvr2, {"model." + k: v for k, v in nlvr2.items()})
    layers = {int(k.split(".")[3]) for k in out if k.startswith("text_encoder.encoder.layer.")}
    assert layers == set(range(TWO.text_layers + 4))  # 1 text layer + 4 fusion layers, ALBEF's numbering
    assert "text_encoder.encoder.layer.1.crossattention.self.key.weight" in out
    assert "cls_head_m.2.weight" in out and not any(k.startswith(("text_proj", "itm_head", "temp")) for k in out)
    student, teacher = import_albef_state_dict(out, list(AlbefClassifier(TWO, 2, images=2).visual_encoder.state_dict()))
    assert student.keys() == nlvr2.keys() and all(torch.equal(student[k], nlvr2[k]) for k in nlvr2)
    ta = TextAssignment(TWO).state_dict()
    exported = export_albef_state_dict(ta, None)
    assert {"ta_head.weight", "ta_head.bias", "vision_proj.weight"} <= exported.keys()
    back, _ = import_albef_state_dict(exported, list(TextAssignment(TWO).visual_encoder.state_dict()))
    assert back.keys() == ta.keys()


@pytest.mark.parametrize("task, recipe", [("nlvr2", "AlbefNlvr2Recipe"), ("ta", "AlbefTextAssignmentRecipe"),
                                          ("vqa", "AlbefVqaRecipe"), ("grounding", "AlbefGroundingRecipe")])
def test_the_demo_configs_pick_their_recipes_and_the_base_ones_pass_the_checks(task, recipe):
    import importlib

    from trainer.config import load_config
    from trainer.recipes import recipe_for

    cfg = load_config(str(REPO / f"configs/finetune/demo-albef-{task}.yaml"))
    assert recipe_for(cfg) is getattr(importlib.import_module(f"trainer.recipes.albef_{task}"), recipe)
    base = load_config(str(REPO / f"configs/finetune/albef-base-{task}.yaml"))
    assert base.tasks == {task: 1.0} and base.optim.lr == (1e-5 if task == "grounding" else 2e-5)
    assert base.optim.weight_decay == 0.02 and base.optim.schedule == "albef_epochs"
    assert base.model.image_size == (256 if task == "ta" else 384)


def test_text_assignment_refuses_a_held_out_split_task_folders_and_vlpt_evaluate():
    from trainer.config import load_config
    from trainer.recipes.albef_ta import AlbefTextAssignmentRecipe

    config = str(REPO / "configs/finetune/demo-albef-ta.yaml")
    with pytest.raises(ValueError, match="no held-out metric.*unset data.val"):
        load_config(config, ["--data.val=demo_pixels/val"])
    with pytest.raises(ValueError, match="text assignment reads picture-caption shards.*unset them"):
        load_config(config, ["--finetune.train=demo_data/tasks/nlvr2/train"])
    with pytest.raises(ValueError, match="nothing to score; evaluate the NLVR2 run"):
        AlbefTextAssignmentRecipe.evaluation_config(load_config(config), None)


def test_a_small_nlvr2_set_is_fitted_through_collate_the_two_image_encoder_and_loss():
    """Plumbing end to end: 12 pairs of random pictures under one statement, labelled by pair, so only the
    pictures tell them apart; fitted within 80 steps."""
    from trainer.models.config import AlbefConfig
    from trainer.recipes.albef_ve import ve_losses  # VE's distilled loss, which NLVR2 shares with 2 classes

    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    rng = np.random.default_rng(0)
    cfg = AlbefConfig(**{**TINY.__dict__, "vocab_size": tok.vocab_size})
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(24)]
    samples = [({"id": str(i), "image_ids": [f"l{i}", f"r{i}"], "text": "the left image contains a red cube",
                 "label": i % 2}, pictures[2 * i:2 * i + 2]) for i in range(12)]
    batch = collate_albef_nlvr2(samples, rng, tok, PixelConfig(image_size=32), 15, train=False)
    torch.manual_seed(0)
    model = AlbefClassifier(cfg, 2, images=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        result = ve_losses(model, batch, torch.zeros(12, 2), 0.4)
        optimizer.zero_grad()
        (result.losses["loss"] / 12).backward()
        optimizer.step()
    assert result.stats["acc"].item() == 12
