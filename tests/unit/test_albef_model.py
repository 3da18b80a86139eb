"""The ALBEF model (tiny): shapes, the three losses, gradients where they belong, the teacher
(an exact copy at start, moved only by the EMA) and its queue push."""
from __future__ import annotations

import pytest
import torch

from trainer.models.albef import Albef, AlbefConfig

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


def test_teacher_starts_as_a_copy_and_is_not_trained():
    torch.manual_seed(0)
    model = Albef(TINY)
    for name in Albef.MOMENTUM:
        student, teacher = getattr(model, name).state_dict(), model.momentum[name].state_dict()
        assert student.keys() == teacher.keys() and all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in model.momentum.parameters())
    assert "itm_head.weight" not in {f"{n}" for n, _ in model.momentum.named_parameters()}
    assert {"queues.image_queue", "queues.text_queue", "queues.ptr"} <= set(model.state_dict())


def test_forward_gives_three_finite_losses_and_gradients_where_they_belong():
    torch.manual_seed(0)
    model = Albef(TINY)
    batch = tiny_batch()
    result = model(batch, alpha=0.4)
    stats = {k: v.item() / 4 for k, v in result.stats.items()}
    assert stats["loss"] == pytest.approx(stats["itc"] + stats["itm"] + stats["mlm"], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    image_m, text_m = result.momentum_features
    assert image_m.shape == text_m.shape == (4, 16) and not image_m.requires_grad
    result.loss_sum.backward()
    for name in ("temp", "itm_head.weight", "vision_proj.weight", "text_proj.weight",
                 "text_encoder.fusion.0.crossattention.self.key.weight", "text_encoder.cls.predictions.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.momentum.parameters())


def test_ema_moves_the_teacher_towards_the_student_and_the_queue_takes_the_features():
    torch.manual_seed(0)
    model = Albef(TINY)
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    before = model.momentum["vision_proj"].weight.clone()
    model.update_momentum()
    want = before * 0.995 + model.vision_proj.weight.detach() * 0.005
    torch.testing.assert_close(model.momentum["vision_proj"].weight.detach(), want, rtol=1e-6, atol=1e-7)
    result = model(tiny_batch(), alpha=0.0)
    model.queues.push(*result.momentum_features)
    assert torch.equal(model.queues.image_queue[:, :4], result.momentum_features[0].t())
    assert int(model.queues.ptr) == 4
