"""ALBEF grounding's pieces (docs/downstream.md, "ALBEF grounding") against values computed here: the explicit
attention equals the fused one, the Grad-CAM equals ALBEF's hook-based reading of the same gradients, boxes score
(map inside) / area^0.5, the candidate boxes RE records may carry, and the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.collate_albef import collate_albef_grounding
from data.pixels import PixelConfig
from data.tasks.records import check_record
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.unit.test_albef_ve import TINY
from trainer.grounding import box_scores, grounded_box, itm_gradcam
from trainer.models.albef import Albef
from trainer.models.bert import SelfAttention, extended_attention_mask

TWO = TINY.__class__(**{**TINY.__dict__, "fusion_layers": 2})


def test_explicit_attention_equals_the_fused_one_and_returns_row_stochastic_probs():
    torch.manual_seed(0)
    attention = SelfAttention(TINY.bert(), context_width=32).eval()
    hidden, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = extended_attention_mask(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]), hidden.dtype)
    out, probs = attention.forward_with_probs(hidden, mask, context)
    torch.testing.assert_close(out, attention(hidden, mask, context), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    assert probs[1, :, :, 4:].abs().max() < 1e-6  # masked keys get no weight


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixels": torch.randn(2, 3, 32, 32, generator=g), "input_ids": torch.randint(4, 50, (2, 5), generator=g),
            "attn_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}


def albefs_gradcam(model: Albef, b: dict, layer: int) -> torch.Tensor:
    """ALBEF's way: the layer's cross-attention saves its probabilities and, by a hook, their gradient during
    `backward()` of the summed match logit; then the same product, mask and means."""
    saved = {}
    target = model.text_encoder.fusion[layer].crossattention.self
    original = target.forward

    def saving(hidden, mask, context=None):
        out, probs = target.forward_with_probs(hidden, mask, context)
        probs.register_hook(lambda g: saved.__setitem__("grad", g))
        saved["probs"] = probs
        return out

    target.forward = saving
    try:
        model.zero_grad()
        image = model.image_tokens(b["pixels"])
        text = model.text_encoder.text(b["input_ids"], b["attn_mask"])
        fused = model.text_encoder.fuse(text, b["attn_mask"], image)
        model.itm_head(fused[:, 0])[:, 1].sum().backward()
    finally:
        target.forward = original
    mask = b["attn_mask"].view(2, 1, -1, 1).float()
    cams = saved["probs"].detach()[..., 1:] * mask
    grads = saved["grad"][..., 1:].clamp(min=0) * mask
    return (cams * grads).mean(1).mean(1)


@pytest.mark.parametrize("layer", [0, 1])
def test_gradcam_is_albefs_and_leaves_no_gradient_on_the_weights(layer):
    torch.manual_seed(2)
    model = Albef(TWO, mlm_head=False).eval()
    with torch.no_grad():  # as scoring calls it
        got = itm_gradcam(model, batch(), layer)
    assert got.shape == (2, 4) and all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(got, albefs_gradcam(model, batch(), layer), rtol=1e-5, atol=1e-9)
    assert got.abs().sum() > 0


def test_boxes_score_the_map_inside_them_over_the_square_root_of_their_area():
    flat = torch.full((4,), 0.5)  # a constant 2 x 2 map stays constant when upsampled
    scores = box_scores(flat, [[0, 0, 4, 9], [10, 20, 25, 16], [2.7, 3.2, 4.0, 4.0]], width=40, height=30)
    # pixels int(x) .. int(x + w), cut at the picture's edge (the second box keeps 10 of its 16 rows)
    assert scores == pytest.approx([0.5 * 36 / 6, 0.5 * 25 * 10 / 20, 0.5 * 16 / 4], rel=1e-5)
    hot = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the bottom-right patch
    example = {"boxes": [[0, 0, 20, 15], [20, 15, 20, 15], [0, 0, 40, 30]], "width": 40, "height": 30}
    assert grounded_box(hot, example) == [20, 15, 20, 15]
    assert grounded_box(-hot - 1, example) == [0, 0, 20, 15]  # every score negative: still the best one


def test_re_records_may_carry_candidate_boxes_and_bad_ones_are_skipped():
    base = {"id": "a", "image_id": "i", "text": "the cube", "target": 0, "box": [1, 2, 3, 4], "width": 10,
            "height": 10}
    assert check_record(base, "re") is None and check_record({**base, "boxes": [[0, 0, 5, 5]]}, "re") is None
    for bad in ([], [[0, 0, 0, 5]], [[0, 0, 5]], [[0, 0, 5, float("nan")]], "boxes", [[0, 0, 5, 5]] * 101):
        assert check_record({**base, "boxes": bad}, "re") == "bad_field", bad


def test_batch_mirrors_expressions_with_pictures_and_indexes_images_by_id():
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    examples = [({"id": "a", "image_id": "s1", "text": "the cube left of the ball"}, [picture]),
                ({"id": "b", "image_id": "s1", "text": "the ball"}, [picture]),
                ({"id": "c", "image_id": "s2", "text": "the disk"}, [picture])]
    train = collate_albef_grounding(examples, np.random.default_rng(0), tok, PixelConfig(image_size=32, hflip_prob=1.0),
                                    30)
    assert train["input_ids"][0, 1:int(train["attn_mask"][0].sum())].tolist() == tok.encode("the cube right of the ball")
    assert train["image_ids"].tolist() == [0, 0, 1] and train["n_images"] == 2
    assert train["image_index"][0] == train["image_index"][1] != train["image_index"][2]
    scoring = [collate_albef_grounding(examples, np.random.default_rng(seed), tok, PixelConfig(image_size=32), 30,
                                       train=False) for seed in (0, 1)]
    assert scoring[0]["ids"] == ["a", "b", "c"] and torch.equal(scoring[0]["pixels"], scoring[1]["pixels"])


def test_gradcam_layer_must_be_a_fusion_layer():
    from trainer.config import load_config

    with pytest.raises(ValueError, match="finetune.gradcam_layer=2 must name one of the model's 2 fusion layers"):
        load_config(str(REPO / "configs/finetune/demo-albef-grounding.yaml"), ["--finetune.gradcam_layer=2"])
