"""The ALBEF student and teacher (tiny): the teacher starts as an fp32 copy without the
temperature and ITM head, the three losses come as sums with their term counts, gradients
reach what they should and never the teacher, the EMA follows its formula, and the
retrieval tasks give normalised features and match logits."""
from __future__ import annotations

import pytest
import torch

from trainer.models.albef import EMBED_TASK, ITM_SCORE_TASK, Albef, AlbefTeacher
from trainer.recipes.albef_tasks import TeacherTargets, albef_losses
from trainer.models.config import AlbefConfig

TINY = AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1,
                   fusion_layers=1, max_position_embeddings=16, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, image_size=32, patch_size=16, vision_width=24,
                   vision_layers=1, vision_heads=2, vision_mlp=48, embed_dim=16, queue_size=8)


def tiny_batch(b: int = 4, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (b, length), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 4:] = 0  # a shorter caption
    ids[1, 4:] = 0
    masked = ids.clone()
    positions = torch.tensor([[0, 2], [1, 3], [2, 1], [3, 5]])  # (row, column) of the masked tokens
    masked[positions[:, 0], positions[:, 1]] = 3  # [MASK]
    return {"pixels": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids, "attn_mask": mask,
            "mlm_input_ids": masked, "mlm_index": positions[:, 0] * length + positions[:, 1],
            "mlm_targets": ids[positions[:, 0], positions[:, 1]], "image_ids": torch.tensor([0, 1, 0, 2])}


def targets(teacher: AlbefTeacher, batch: dict, alpha: float = 0.4) -> TeacherTargets:
    image_m, image_feat_m, text_feat_m = teacher.encode(batch)
    return TeacherTargets(image_feat_m, text_feat_m, teacher.queues.image_queue, teacher.queues.text_queue,
                          offset=0, mlm_logits_m=teacher.mlm_logits(batch, image_m), alpha=alpha, negatives_seed=3)


def test_teacher_starts_as_an_fp32_copy_and_is_not_trained():
    torch.manual_seed(0)
    model = Albef(TINY)
    teacher = AlbefTeacher(model)
    for name in Albef.TEACHER_PARTS:
        student, copy = getattr(model, name).state_dict(), getattr(teacher, name).state_dict()
        assert student.keys() == copy.keys() and all(torch.equal(student[k], copy[k]) for k in student)
    assert not any(p.requires_grad for p in teacher.parameters())
    names = set(teacher.state_dict())
    assert not any(n.startswith(("itm_head", "temp")) for n in names)
    assert {"queues.image_queue", "queues.text_queue", "queues.ptr"} <= names
    assert "text_encoder.cls.predictions.bias" in names  # the MLM head is distilled from


def test_losses_are_sums_with_their_counts_and_gradients_reach_the_student_only():
    torch.manual_seed(0)
    model = Albef(TINY)
    teacher = AlbefTeacher(model)
    batch = tiny_batch()
    result = model(batch, albef_losses, targets(teacher, batch))
    assert {k: int(v) for k, v in result.counts.items()} == {"itc": 4, "itm": 12, "itm_acc": 12, "mlm": 4,
                                                              "temp": 4}
    assert set(result.losses) == {"itc", "itm", "mlm"}
    for name, loss in result.losses.items():  # stats carry the detached sums of the losses
        torch.testing.assert_close(result.stats[name], loss.detach())
        assert loss.requires_grad and not result.stats[name].requires_grad
    assert result.stats["temp"].item() / 4 == pytest.approx(0.07)
    assert all(torch.isfinite(v) for v in result.losses.values())
    sum(result.losses.values()).backward()
    for name in ("temp", "itm_head.weight", "vision_proj.weight", "text_proj.weight",
                 "text_encoder.fusion.0.crossattention.self.key.weight", "text_encoder.cls.predictions.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_the_same_negatives_seed_draws_the_same_negatives():
    torch.manual_seed(0)
    model = Albef(TINY)
    teacher = AlbefTeacher(model)
    batch = tiny_batch()
    a, b = (model(batch, albef_losses, targets(teacher, batch)).losses["itm"] for _ in range(2))
    assert torch.equal(a, b)


def test_a_batch_without_masked_tokens_has_a_zero_mlm_loss():
    torch.manual_seed(0)
    model = Albef(TINY)
    teacher = AlbefTeacher(model)
    batch = tiny_batch()
    batch.update(mlm_index=batch["mlm_index"][:0], mlm_targets=batch["mlm_targets"][:0],
                 mlm_input_ids=batch["input_ids"])
    result = model(batch, albef_losses, targets(teacher, batch))
    assert result.losses["mlm"].item() == 0.0 and int(result.counts["mlm"]) == 0
    sum(result.losses.values()).backward()  # still one graph over every parameter


def test_ema_moves_the_teacher_towards_the_student():
    torch.manual_seed(0)
    model = Albef(TINY)
    teacher = AlbefTeacher(model)
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    before = teacher.vision_proj.weight.clone()
    teacher.update(model)
    want = before * 0.995 + model.vision_proj.weight.detach() * 0.005
    torch.testing.assert_close(teacher.vision_proj.weight.detach(), want, rtol=1e-6, atol=1e-7)


def test_retrieval_tasks():
    torch.manual_seed(0)
    model = Albef(TINY).eval()
    batch = tiny_batch()
    out = model({k: batch[k] for k in ("pixels", "input_ids", "attn_mask")}, EMBED_TASK)
    assert out["image_feat"].shape == out["text_feat"].shape == (4, 16)
    torch.testing.assert_close(out["image_feat"].norm(dim=1), torch.ones(4))
    assert out["image_tokens"].shape == (4, 5, 24) and out["text_states"].shape == (4, 6, 32)
    scores = model({"text_states": out["text_states"], "attn_mask": batch["attn_mask"],
                    "image_tokens": out["image_tokens"]}, ITM_SCORE_TASK)
    assert scores.shape == (4,)
    assert EMBED_TASK is Albef.embed and ITM_SCORE_TASK is Albef.itm_score
    torch.testing.assert_close(model.itm_score({"text_states": out["text_states"], "attn_mask": batch["attn_mask"],
                                                "image_tokens": out["image_tokens"]}), scores)
    # the forward runs the function it is given with the arguments it is given: the training losses
    # without the teacher's targets, or a task name instead of a function, are refused
    with pytest.raises(TypeError, match="teacher"):
        model(batch, albef_losses)
    with pytest.raises(TypeError, match="not callable"):
        model(batch, "mlm")
