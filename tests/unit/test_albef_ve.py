"""ALBEF visual entailment's pieces (docs/downstream.md, "ALBEF visual entailment") against values computed
here: the distilled loss, ALBEF's label order, the batch (downstream text, mirrored hypotheses), the model's
new head and its loading from a pretraining checkpoint, and the picture store a task folder is joined to."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from data.collate_albef import ALBEF_VE_LABELS, collate_albef_ve
from data.pixels import PixelConfig
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from trainer.models.albef import Albef, AlbefTeacher
from trainer.models.albef_classifier import AlbefClassifier, MomentumCopy
from trainer.models.albef_finetune_load import load_into
from trainer.models.config import AlbefConfig
from trainer.objectives.albef import distilled_classification_loss
from trainer.recipes.albef_ve import NEW, NOT_IN_VE, TO_UNITER_ORDER, ve_losses

TINY = AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1,
                   fusion_layers=1, max_position_embeddings=16, vision_width=32, vision_layers=1, vision_heads=2,
                   vision_mlp=64, image_size=32, patch_size=16, embed_dim=8, queue_size=6,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_distilled_loss_is_the_per_example_sum_computed_by_hand(alpha):
    g = torch.Generator().manual_seed(0)
    logits, logits_m = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                                        dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    want = 0.0
    for z, zm, y in zip(logits.tolist(), logits_m.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in z))
        p_m = [math.exp(v) / sum(math.exp(u) for u in zm) for v in zm]
        ce = -(z[y] - log_z)
        soft = -sum(p * (v - log_z) for p, v in zip(p_m, z))
        want += (1 - alpha) * ce + alpha * soft
    got = distilled_classification_loss(logits, logits_m, labels, alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)  # computed in fp32, as in training


def test_label_orders_differ_from_uniters_and_are_mapped_both_ways():
    assert ALBEF_VE_LABELS == ("contradiction", "neutral", "entailment")
    # ALBEF logits [c, n, e] read in the task folder's order (contradiction, entailment, neutral)
    assert np.array([10.0, 11.0, 12.0])[TO_UNITER_ORDER].tolist() == [10.0, 12.0, 11.0]


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_batch_has_albef_labels_downstream_text_and_mirrored_hypotheses():
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    examples = [{"id": "a", "image_id": "i", "text": "the red cube is left of the ball.", "label": 1},  # entailment
                {"id": "b", "image_id": "i", "text": "the cube is red", "label": 2},  # neutral
                {"id": "c", "image_id": "i", "text": "the cube is red", "label": 0}]
    samples = [(r, [picture()]) for r in examples]
    pixels = PixelConfig(image_size=32, hflip_prob=1.0)
    batch = collate_albef_ve(samples, np.random.default_rng(0), tok, pixels, 30)
    assert batch["labels"].tolist() == [2, 1, 0]
    assert batch["input_ids"][0].tolist()[:batch["attn_mask"][0].sum()] == \
        [tok.cls_id] + tok.encode("the red cube is right of the ball")  # mirrored, punctuation deleted, no [SEP]
    evaluation = collate_albef_ve(samples, np.random.default_rng(0), tok, pixels, 30, train=False)
    assert evaluation["input_ids"][0].tolist()[:evaluation["attn_mask"][0].sum()] == \
        [tok.cls_id] + tok.encode("the red cube is left of the ball")  # evaluation never mirrors
    unlabelled = collate_albef_ve([({"id": "d", "image_id": "i", "text": "x"}, [picture()])],
                                  np.random.default_rng(0), tok, pixels, 30, train=False)
    assert unlabelled["labels"].tolist() == [-100]


def test_the_new_head_has_pytorch_default_init_and_the_loss_trains_every_part():
    torch.manual_seed(0)
    model = AlbefClassifier(TINY, 3)
    bound = 1 / math.sqrt(TINY.hidden_size)  # nn.Linear's kaiming-uniform bound, not BERT's N(0, 0.02)
    w = model.cls_head[0].weight
    assert w.abs().max() <= bound and w.std() > 0.05
    batch = {"pixels": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(5, 50, (2, 5)),
             "attn_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 2]), "n_items": 2}
    result = ve_losses(model, batch, torch.zeros(2, 3), 0.4)
    result.losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert 0 <= result.stats["acc"].item() <= 2


def test_loading_a_pretraining_checkpoint_keeps_the_encoders_and_drops_what_ve_has_no_place_for():
    torch.manual_seed(0)
    pretrained = Albef(TINY)
    pre_teacher = AlbefTeacher(pretrained)
    with torch.no_grad():
        for p in pre_teacher.parameters():
            p.add_(1.0)
    model = AlbefClassifier(TINY, 3)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_head.")}
    dropped = load_into(model, pretrained.state_dict(), "src", new=NEW, dropped=NOT_IN_VE)
    assert {k.split(".")[0] for k in dropped} == {"vision_proj", "text_proj", "itm_head", "temp", "text_encoder"}
    for k, v in model.state_dict().items():
        want = head[k] if k.startswith("cls_head.") else pretrained.state_dict()[k]
        assert torch.equal(v, want), k
    teacher = MomentumCopy(model)
    parts = {k: v for k, v in pre_teacher.state_dict().items() if k.startswith(AlbefClassifier.TEACHER_PARTS)}
    load_into(teacher.model, parts, "src teacher", new=NEW, dropped=NOT_IN_VE)
    assert torch.equal(teacher.model.visual_encoder.embeddings.cls_token,
                       pre_teacher.visual_encoder.embeddings.cls_token)
    assert torch.equal(teacher.model.cls_head[2].weight, model.cls_head[2].weight)  # ALBEF's copy_params
    with pytest.raises(ValueError, match="missing .*cls_head"):  # evaluating needs a fine-tuned head
        load_into(AlbefClassifier(TINY, 3), pretrained.state_dict(), "src", dropped=NOT_IN_VE)


def test_the_teacher_moves_by_ema_part_by_part():
    torch.manual_seed(0)
    model = AlbefClassifier(TINY, 3)
    teacher = MomentumCopy(model)
    with torch.no_grad():
        model.cls_head[2].bias.add_(1.0)
    before = teacher.model.cls_head[2].bias.clone()
    teacher.update(model)
    m = TINY.momentum
    torch.testing.assert_close(teacher.model.cls_head[2].bias, m * before + (1 - m) * model.cls_head[2].bias)


def test_a_small_training_set_is_fitted_through_collate_model_and_loss():
    """Plumbing end to end: 12 (picture, hypothesis) pairs, labels by picture, fitted within 80 steps."""
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    rng = np.random.default_rng(0)
    cfg = AlbefConfig(**{**TINY.__dict__, "vocab_size": tok.vocab_size})
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    samples = [({"id": str(i), "image_id": str(i), "text": "the cube is red", "label": i % 3}, [p])
               for i, p in enumerate(pictures)]
    batch = collate_albef_ve(samples, rng, tok, PixelConfig(image_size=32), 30, train=False)
    torch.manual_seed(0)
    model = AlbefClassifier(cfg, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        result = ve_losses(model, batch, torch.zeros(12, 3), 0.4)
        optimizer.zero_grad()
        (result.losses["loss"] / 12).backward()
        optimizer.step()
    assert result.stats["acc"].item() == 12
