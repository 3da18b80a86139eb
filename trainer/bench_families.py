"""What `vlpt bench train` does differently per model family, in one table (`FAMILIES`).

The timing, both training loops and the sweep are the same for every family (trainer/bench_train.py);
a family adds only its plain-way model, the plain ops its baseline runs under, and how a sweep
point's batch size is fitted into its config. A family with no entry gets `BenchFamily()`: the same
model and ops on both sides, only the engine and the loop differ.

  uniter  baseline: Hugging Face `BertEncoder` as the backbone with the same weights, boolean-mask
          gathers in the heads (`hidden[mask]`, a host sync each) and UNITER's eager IPOT loop;
  albef   baseline: the very same model and ops (ALBEF's reference code has no fused ops to take
          away); a sweep point also fits `model.queue_size` to the point's global batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager
from unittest import mock

import torch
from torch import Tensor, nn

from trainer.config import Config
from trainer.models.bert import extended_attention_mask


# ---------------------------------------------------------------- UNITER's plain way


class HuggingFaceEncoder(nn.Module):
    """`transformers`' BertEncoder in the place of ours (same parameter names)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEncoder

        hf = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size, hidden_act="gelu",
                        hidden_dropout_prob=cfg.hidden_dropout_prob,
                        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
                        layer_norm_eps=1e-12)
        self.layer = BertEncoder(hf).layer

    def forward(self, hidden: Tensor, attn_masks: Tensor, segment_ids: Tensor = None) -> Tensor:
        if segment_ids is None:
            mask = extended_attention_mask(attn_masks, hidden.dtype)  # [B, 1, 1, L]
        else:  # packed rows (data/packing.py): the same additive block-diagonal mask as ours
            from trainer.models.bert import block_diagonal_mask

            mask = block_diagonal_mask(segment_ids, hidden.dtype)  # [R, 1, Lp, Lp]
        for layer in self.layer:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def uniter_plain_model(model: nn.Module) -> nn.Module:
    """`model` with its encoder swapped for Hugging Face's, carrying the same weights."""
    encoder = HuggingFaceEncoder(model.config)
    encoder.load_state_dict(model.uniter.encoder.state_dict(), strict=True)
    model.uniter.encoder = encoder
    return model


def boolean_mask_gather(hidden: Tensor, index: Tensor) -> Tensor:
    """UNITER's gather: a boolean mask over every position, `hidden[mask]` (synchronises)."""
    b, length, h = hidden.shape
    mask = torch.zeros(b * length, dtype=torch.bool, device=hidden.device)
    mask[index] = True  # collate's positions are ascending, so the rows come out in its order
    return hidden.reshape(b * length, h)[mask]  # [N, H]


@contextlib.contextmanager
def uniter_plain_ops():
    """Boolean-mask gathers in the heads and the eager IPOT loop (kernels off)."""
    import trainer.recipes.uniter_tasks as tasks

    with mock.patch.dict(os.environ, {"VLPT_KERNELS": "off"}), \
            mock.patch.object(tasks, "masked_gather", boolean_mask_gather):
        yield


# ---------------------------------------------------------------- sweep points


def batch_config(cfg: Config, micro: int, world: int) -> Config:
    """`cfg` at `micro` samples per GPU, no accumulation. Its batches are read in this process
    (passing batches of hundreds of MB from DataLoader workers costs more than decoding them, and the
    pipeline is not measured) with shards drawn with replacement, so every batch is full however
    few samples the data holds."""
    if cfg.data.uniter.token_budget:
        raise ValueError("bench train --sweep sizes micro-batches by samples; set data.uniter.token_budget=0")
    data = dataclasses.replace(cfg.data, micro_batch_size=micro, num_workers=0, resampled=True)
    return dataclasses.replace(cfg, data=data, optim=dataclasses.replace(cfg.optim, global_batch_size=micro * world))


def albef_batch_config(cfg: Config, micro: int, world: int) -> Config:
    """ALBEF's queue must hold whole global batches: the largest multiple of the point's global
    batch within the configured queue (at least one batch), so ITC's width stays about the same."""
    cfg = batch_config(cfg, micro, world)
    size = max(1, cfg.model.queue_size // (micro * world)) * micro * world
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, queue_size=size))


# ---------------------------------------------------------------- the table


def _same_model(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class BenchFamily:
    plain_model: Callable[[nn.Module], nn.Module] = field(default=_same_model)
    """Our model -> the plain way's (same weights)."""
    plain_ops: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    """Context the baseline's steps run under."""
    point_config: Callable[[Config, int, int], Config] = field(default=batch_config)
    """(config, micro-batch size, world size) -> the config of a sweep point."""
    min_micro_batch: int = 1
    """Smallest micro-batch its step can train on."""


FAMILIES = {
    "uniter": BenchFamily(uniter_plain_model, uniter_plain_ops),
    # ALBEF draws each pair's hard negatives from the other pairs of its micro-batch
    "albef": BenchFamily(point_config=albef_batch_config, min_micro_batch=2),
}


def bench_family(arch: str) -> BenchFamily:
    return FAMILIES.get(arch, BenchFamily())
