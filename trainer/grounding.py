"""ALBEF's weakly-supervised grounding (docs/downstream.md, "ALBEF grounding"), as ALBEF's `Grounding.py` in
`itm` mode: a Grad-CAM map of the picture from the ITM head's match logit, taken at one fusion layer's
cross-attention, then every candidate box of the picture scored by the map inside it; the best box is right
when its IoU with the referred box is >= 0.5.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.models.bert import extended_attention_mask

BOX_AREA_POWER = 0.5
"""A box scores (map inside it) / area ** 0.5 (ALBEF's `alpha`)."""


def itm_gradcam(model, batch: dict, layer: int) -> Tensor:
    """[B, P] Grad-CAM of each (expression, picture) pair over the P picture patches: at fusion layer `layer`
    the cross-attention probabilities times their positive gradient of the summed positive ITM logit, the image
    [CLS] column dropped, text padding zeroed, averaged over heads then text positions (ALBEF's
    `gradcam.mean(1).mean(1)`). Runs with gradients whatever the caller's mode; the weights get none."""
    with torch.enable_grad():
        encoder, mask = model.text_encoder, batch["attn_mask"]
        image = model.image_tokens(batch["pixels"])  # [B, 1+P, Hv]
        hidden = encoder.text(batch["input_ids"], mask)  # [B, L, H]
        key_mask = extended_attention_mask(mask, hidden.dtype)
        probs = None
        for k, fusion in enumerate(encoder.fusion):
            if k != layer:
                hidden = fusion(hidden, key_mask, image)
                continue
            attn = fusion.attention(hidden, key_mask)
            ctx, probs = fusion.crossattention.self.forward_with_probs(attn, None, image)  # probs [B, nh, L, 1+P]
            cross = fusion.crossattention.output(ctx, attn)
            hidden = fusion.output(fusion.intermediate(cross), cross)
        assert probs is not None, f"fusion layer {layer} is outside the model's {len(encoder.fusion)}"
        match = model.itm_head(hidden[:, 0])[:, 1].float().sum()
        grads, = torch.autograd.grad(match, probs)
    text = mask[:, None, :, None].to(probs.dtype)  # [B, 1, L, 1]
    cam = probs.detach()[..., 1:] * text * (grads[..., 1:].clamp(min=0) * text)  # [B, nh, L, P]
    return cam.float().mean(1).mean(1)  # [B, P]


def box_scores(cam: Tensor, boxes: Sequence[Sequence[float]], width: int, height: int) -> list[float]:
    """Each [x, y, w, h] candidate box's score: the Grad-CAM grid [g, g] upsampled bicubically to the picture's
    height x width, summed over the box's pixels [int(y), int(y + h)) x [int(x), int(x + w)), divided by its
    area ** 0.5 (ALBEF's `grounding_eval`)."""
    side = math.isqrt(cam.numel())
    assert side * side == cam.numel(), "the Grad-CAM is not a square grid of patches"
    full = F.interpolate(cam.reshape(1, 1, side, side).float(), size=(int(height), int(width)), mode="bicubic",
                         align_corners=False)[0, 0]  # [H, W]
    scores = []
    for x, y, w, h in boxes:
        inside = full[int(y):int(y + h), int(x):int(x + w)]
        scores.append(float(inside.sum()) / (w * h) ** BOX_AREA_POWER)
    return scores


def grounded_box(cam: Tensor, example: dict) -> list[float]:
    """The example's candidate box (its `boxes`) the Grad-CAM scores highest (the first of ties). ALBEF keeps
    its previous pick when no box scores above 0; here the best box is taken whatever its sign."""
    scores = box_scores(cam, example["boxes"], example["width"], example["height"])
    return list(example["boxes"][max(range(len(scores)), key=scores.__getitem__)])
