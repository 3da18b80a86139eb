"""UNITER with its pretraining heads (MLM, MRFR, MRC, ITM) and the model builder."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from trainer.models.bert import init_bert_weights
from trainer.models.config import ModelConfig
from trainer.models.convert import load_bert_directory, load_uniter_checkpoint
from trainer.models.heads import MlmHead, RegionClassification, RegionFeatureRegression
from trainer.models.sharing import register_shared_parameters
from trainer.models.uniter import UniterModel, cast_region_features

_TEXT_KEYS = ("input_ids", "position_ids", "attn_masks")
_IMAGE_KEYS = ("img_feat", "img_pos_feat", "gather_index")


class UniterForPretraining(nn.Module):
    """UNITER backbone + heads; state-dict keys are UNITER's minus the two tied duplicates.

    Registration order follows UNITER's key order so exported checkpoints list
    keys in the same order as the originals.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.uniter = UniterModel(cfg)
        self.cls = MlmHead(h, cfg.vocab_size)
        self.feat_regress = RegionFeatureRegression(h, cfg.img_dim)
        self.region_classifier = RegionClassification(h, cfg.img_label_dim)
        self.itm_output = nn.Linear(h, 2)
        for head in (self.cls, self.feat_regress, self.region_classifier, self.itm_output):
            head.apply(lambda m: init_bert_weights(m, cfg.initializer_range))
        nn.init.zeros_(self.cls.predictions.bias)
        nn.init.zeros_(self.feat_regress.bias)
        uniter = self.uniter
        register_shared_parameters([(self.cls, uniter.embeddings.word_embeddings.weight),
                                    (self.feat_regress, uniter.img_embeddings.img_linear.weight),
                                    (uniter, uniter.embeddings.token_type_embeddings.weight),
                                    (uniter.img_embeddings, uniter.img_embeddings.mask_embedding.weight)])

    def forward(self, batch: dict, task: Callable, *args):
        """`task(self, batch, *args)` on a collated batch -> `TaskResult` (summed losses and stats).

        `task` is one of the recipe's task functions (trainer/recipes/uniter_tasks.py). Running it
        here, inside the module the DeepSpeed engine wraps, lets one engine serve every task of
        the mix, as UNITER's model dispatches on its task inside forward.
        """
        result = task(self, self._cast_features(batch), *args)
        zero = self._zero_for_unreached(batch["input_ids"].device)
        result.losses = {name: loss + zero for name, loss in result.losses.items()}
        return result

    def _zero_for_unreached(self, device: torch.device) -> Tensor:
        """0 x (every head and the mask embedding on a zero input): an exact 0.

        A task reaches only its own head. Stages 0-2 of ZeRO give the others a zero
        gradient (as UNITER, whose zero_grad zeroes rather than frees gradients), but
        ZeRO-3 keeps the gradient of the last step that reached them, so a head's update
        repeats after a task switch. With this term every parameter is part of every
        step's graph with an exact zero gradient: all stages agree, the loss is unchanged.
        """
        dtype = self.uniter.embeddings.word_embeddings.weight.dtype
        x = torch.zeros(1, 1, self.config.hidden_size, dtype=dtype, device=device)  # [1, 1, H]
        mask_row = torch.ones(1, dtype=torch.long, device=device)  # [1]
        outputs = (self.itm_logits(x), self.mlm_logits(x[0]), self.mrfr_features(x[0]),
                   self.mrc_logits(x[0]), self.uniter.img_embeddings.mask_embedding(mask_row))
        return sum(o.float().sum() for o in outputs) * 0.0

    def _cast_features(self, batch: dict) -> dict:
        return cast_region_features(batch, self.uniter.img_embeddings.img_linear.weight.dtype)

    def encode(self, batch: Mapping[str, Optional[Tensor]], img_masks: Optional[Tensor] = None) -> Tensor:
        """Run the backbone on a collated batch -> last hidden states [B, L, H], or [R, Lp, H] for
        a batch packed into multi-sample rows (its `pack_index` / `segment_ids`, data/packing.py).

        Image keys may be absent or None for text-only batches.
        """
        missing = [k for k in _TEXT_KEYS if batch.get(k) is None]
        if missing:
            raise ValueError(f"batch is missing {missing}; expected keys {_TEXT_KEYS + _IMAGE_KEYS}")
        return self.uniter(
            batch["input_ids"],
            batch["position_ids"],
            batch.get("img_feat"),
            batch.get("img_pos_feat"),
            batch["attn_masks"],
            batch.get("gather_index"),
            img_masks=img_masks,
            pack_index=batch.get("pack_index"),
            segment_ids=batch.get("segment_ids"),
        )

    def mlm_logits(self, h: Tensor) -> Tensor:
        """h [N, H] (masked text positions) -> vocabulary logits [N, V]."""
        return self.cls(h, self.uniter.embeddings.word_embeddings.weight)

    def mrfr_features(self, h: Tensor) -> Tensor:
        """h [N, H] (masked regions) -> regressed features [N, img_dim]."""
        return self.feat_regress(h, self.uniter.img_embeddings.img_linear.weight)

    def mrc_logits(self, h: Tensor) -> Tensor:
        """h [N, H] (masked regions) -> detector-class logits [N, img_label_dim]."""
        return self.region_classifier(h)

    def itm_logits(self, hidden: Tensor, cls_index: Optional[Tensor] = None) -> Tensor:
        """hidden [B, L, H] -> match / no-match logits [B, 2] from the pooled [CLS]; packed rows
        [R, Lp, H] need the batch's `cls_index` [B]."""
        return self.itm_output(self.uniter.pooled(hidden, cls_index))


def build_uniter(cfg: ModelConfig) -> UniterForPretraining:
    """UNITER with `init_from_bert`, then `init_from_uniter`, applied if set."""
    model = UniterForPretraining(cfg)
    if cfg.init_from_bert:
        load_bert_directory(model, cfg.init_from_bert)
    if cfg.init_from_uniter:
        load_uniter_checkpoint(model, cfg.init_from_uniter)
    return model
