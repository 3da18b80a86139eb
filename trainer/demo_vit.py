"""`vlpt demo-vit`: the pixel demo's stand-in for the pretrained DeiT that ALBEF starts from.

ALBEF's fusion layers read a pretrained ViT's patch tokens from step 0. From a random ViT, the few-minute demo
never gets its fusion layers to read the picture (docs/models.md, "ALBEF ITM in the pixel demo"). This trains
the demo model's ViT on demo-style pictures of its *own* scenes (another seed: no demo scene is seen). It names
the object under each patch (8 shapes x 8 colours, or background) and the set of objects in the picture. The
result is a Hugging Face ViT directory that `model.init_from_vit` reads."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.collate_albef import eval_images
from data.demo_pixels import object_boxes, render_scene
from data.demo_scenes import DEMO_COLOURS, DEMO_SHAPES, DemoScene, generate_scenes
from data.pixels import PixelConfig
from trainer.models.albef import vision_transformer
from trainer.models.config import AlbefConfig

OBJECT_CLASSES = len(DEMO_SHAPES) * len(DEMO_COLOURS)
"""(shape, colour) codes; patch class 0 is background, 1 + code an object."""


@dataclass(frozen=True)
class DemoVitSettings:
    scenes: int = 6000
    """Training pictures; the first `held_out` of them only measure."""
    held_out: int = 500
    steps: int = 800
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 7
    """Scene stream and initialisation; the demo data uses seed 0, so these are other scenes."""

    def __post_init__(self) -> None:
        if self.scenes <= self.held_out or self.held_out < 1:
            raise ValueError(f"demo-vit: need more scenes ({self.scenes}) than held-out scenes ({self.held_out}), "
                             "and at least one held out")
        if min(self.steps, self.batch_size, self.warmup_steps + 1) < 1 or self.lr <= 0:
            raise ValueError("demo-vit: steps, batch_size >= 1, warmup_steps >= 0 and lr > 0")


def patch_targets(scene: DemoScene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(class of each patch [grid²] int64: the object drawn last over the patch centre, 1 + code, else 0;
    the picture's objects, multi-hot [OBJECT_CLASSES] float32), in the picture's row-major patch order."""
    centres = (np.arange(grid) + 0.5) / grid  # [grid]
    cx, cy = np.meshgrid(centres, centres)  # [grid, grid]: x varies along a row
    patches = np.zeros((grid, grid), dtype=np.int64)
    present = np.zeros(OBJECT_CLASSES, dtype=np.float32)
    for (shape, colour), bb in object_boxes(scene):  # render_scene's drawing order: later ones on top
        code = shape * len(DEMO_COLOURS) + colour
        present[code] = 1.0
        inside = (bb[0] <= cx) & (cx <= bb[2]) & (bb[1] <= cy) & (cy <= bb[3])
        patches[inside] = 1 + code
    return patches.reshape(-1), present


def demo_vit_data(cfg: AlbefConfig, settings: DemoVitSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pictures [N, 3, S, S] as the demo's evaluation views, patch classes [N, P], objects [N, OBJECT_CLASSES])."""
    grid = cfg.image_size // cfg.patch_size
    pictures, patches, present = [], [], []
    for scene in generate_scenes("train", settings.scenes, seed=settings.seed):
        pictures.append(render_scene(scene, cfg.image_size))
        p, o = patch_targets(scene, grid)
        patches.append(p)
        present.append(o)
    views = eval_images(pictures, PixelConfig(image_size=cfg.image_size))
    return views, torch.from_numpy(np.stack(patches)), torch.from_numpy(np.stack(present))


class DemoVitHeads(nn.Module):
    """Linear heads: patch tokens -> patch class, [CLS] -> objects present (logits)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch = nn.Linear(width, 1 + OBJECT_CLASSES)
        self.objects = nn.Linear(width, OBJECT_CLASSES)

    def losses(self, tokens: torch.Tensor, patches: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1+P, W] -> patch CE (mean over patches) + object BCE (mean over pictures and classes)."""
        patch_logits = self.patch(tokens[:, 1:])  # [B, P, 1+C]
        return (F.cross_entropy(patch_logits.flatten(0, 1), patches.flatten())
                + F.binary_cross_entropy_with_logits(self.objects(tokens[:, 0]), present))


@torch.no_grad()
def object_patch_accuracy(vit: nn.Module, heads: DemoVitHeads, views: torch.Tensor, patches: torch.Tensor) -> float:
    """Share of the object patches (class > 0) whose class the patch head names."""
    vit.eval()
    hits = total = 0
    for k in range(0, len(views), 250):
        pred = heads.patch(vit(pixel_values=views[k:k + 250]).last_hidden_state[:, 1:]).argmax(-1)  # [b, P]
        target = patches[k:k + 250]
        hits += int(((pred == target) & (target > 0)).sum())
        total += int((target > 0).sum())
    vit.train()
    return hits / max(total, 1)


def learning_rate(settings: DemoVitSettings, step: int) -> float:
    """Linear warm-up, then cosine to 0 over `steps`."""
    warm = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    return settings.lr * warm * 0.5 * (1 + math.cos(math.pi * step / settings.steps))


def train_demo_vit(cfg: AlbefConfig, out: str, settings: DemoVitSettings = DemoVitSettings()) -> dict:
    """Train the image encoder of `cfg`'s sizes and save it (config.json, weights, demo_vit.json) in `out`."""
    torch.manual_seed(settings.seed)
    start = time.time()
    views, patches, present = demo_vit_data(cfg, settings)
    vit, heads = vision_transformer(cfg), DemoVitHeads(cfg.vision_width)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    draw = torch.Generator().manual_seed(settings.seed)
    h = settings.held_out
    before = object_patch_accuracy(vit, heads, views[:h], patches[:h])
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(settings, step)
        idx = torch.randint(h, len(views), (settings.batch_size,), generator=draw)  # [b], training scenes only
        loss = heads.losses(vit(pixel_values=views[idx]).last_hidden_state, patches[idx], present[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    summary = {"settings": asdict(settings), "final_loss": round(loss.detach().item(), 4),
               "object_patch_acc_before": round(before, 4),
               "object_patch_acc": round(object_patch_accuracy(vit, heads, views[:h], patches[:h]), 4),
               "object_patch_chance": round(1 / (1 + OBJECT_CLASSES), 4), "seconds": round(time.time() - start, 1)}
    os.makedirs(out, exist_ok=True)
    vit.save_pretrained(out)
    with open(os.path.join(out, "demo_vit.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
