"""UNITER with one downstream task head (docs/downstream.md): VQA, VE, retrieval, NLVR2, RE, VCR.

Head modules carry UNITER's own parameter names (`vqa_output.3.weight`, `attn1.in_proj_weight`,
...) so fine-tuned checkpoints keep UNITER's key set. Loading a pretraining dict into this model
is `trainer/models/downstream_load.py`; the losses are `trainer/objectives/downstream.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.tasks.collate import NLVR2_VARIANTS
from data.tasks.records import TASKS
from trainer.models.bert import LN_EPS, MASK_VALUE, init_bert_weights
from trainer.models.config import ModelConfig
from trainer.models.sharing import register_shared_parameters
from trainer.models.uniter import UniterModel, cast_region_features

RE_LOSSES = ("cls", "rank")
VQA_ANSWERS = 3129
VE_CLASSES = 3  # contradiction 0, entailment 1, neutral 2 (UNITER's order)
# Rows of the token-type table per task: NLVR2 adds the right image (type 2), VCR the answer
# and rationale types (2, 3); the others keep the pretraining table (text 0, regions 1).
TASK_TYPE_ROWS = {"nlvr2": 3, "vcr": 4}
_FINETUNE_KEYS = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")


@dataclass(frozen=True)
class HeadConfig:
    """Which downstream head to build and how (docs/downstream.md)."""

    task: str
    """One of vqa, ve, retrieval, nlvr2, re, vcr."""
    num_answers: int = VQA_ANSWERS
    """VQA answer vocabulary size A; VE always has 3 classes (the default is replaced by 3)."""
    nlvr2_variant: str = "paired-attn"
    """NLVR2 input layout: paired, triplet or paired-attn."""
    re_mlp: int = 1
    """RE scorer: 1 = Linear(H, 1); 2 = Linear(H, H) -> GELU -> LN -> Linear(H, 1)."""
    re_loss: str = "cls"
    """RE training loss: cls (CE over the regions) or rank (hinge on sigmoid scores)."""
    vcr_extra_words: int = 81
    """Rows VCR appends to the word table (its special tokens)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"head task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task == "ve" and self.num_answers == VQA_ANSWERS:
            object.__setattr__(self, "num_answers", VE_CLASSES)  # frozen: set once, here
        if self.task == "ve" and self.num_answers != VE_CLASSES:
            raise ValueError(f"ve has {VE_CLASSES} classes, got num_answers={self.num_answers}; leave it unset")
        if self.num_answers <= 0:
            raise ValueError(f"num_answers must be > 0 (the size of the answer vocabulary), got {self.num_answers}")
        if self.nlvr2_variant not in NLVR2_VARIANTS:
            raise ValueError(f"nlvr2_variant {self.nlvr2_variant!r} is not one of {', '.join(NLVR2_VARIANTS)}")
        if self.re_mlp not in (1, 2):
            raise ValueError(f"re_mlp must be 1 or 2 (scorer layers), got {self.re_mlp}")
        if self.re_loss not in RE_LOSSES:
            raise ValueError(f"re_loss {self.re_loss!r} is not one of {', '.join(RE_LOSSES)}")
        if self.vcr_extra_words < 0:
            raise ValueError(f"vcr_extra_words must be >= 0, got {self.vcr_extra_words}")

    @property
    def paired_attn(self) -> bool:
        return self.task == "nlvr2" and self.nlvr2_variant == "paired-attn"


def task_model_config(cfg: ModelConfig, head: HeadConfig) -> ModelConfig:
    """The backbone config of a task: NLVR2/VCR's larger type table, VCR's larger word table."""
    changes = {}
    if head.task in TASK_TYPE_ROWS:
        changes["type_vocab_size"] = TASK_TYPE_ROWS[head.task]
    if head.task == "vcr":
        changes["vocab_size"] = cfg.vocab_size + head.vcr_extra_words
    return dataclasses.replace(cfg, **changes)


class AttentionPool(nn.Module):
    """NLVR2 paired-attn pooling: softmax over length of ReLU(Linear(x)), pads at -1e4, dropout,
    weighted sum. `fc.0` is the Linear, as UNITER's key name."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        """x [n, L, H], pad [n, L] (True = pad) -> [n, H]."""
        # -1e4 (UNITER's value), not -inf: finite in fp16 and the same probabilities in fp32.
        score = self.fc(x).squeeze(-1) + pad.to(x.dtype) * MASK_VALUE  # [n, L]
        weight = self.dropout(F.softmax(score, dim=1))  # [n, L]
        return weight.unsqueeze(1).matmul(x).squeeze(1)  # [n, H]


def _vqa_head(h: int, answers: int) -> nn.Sequential:
    """`.0` Linear(H, 2H) `.1` GELU(erf) `.2` LN(2H) `.3` Linear(2H, A)."""
    return nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=LN_EPS), nn.Linear(2 * h, answers))


def _re_head(h: int, mlp: int) -> nn.Module:
    if mlp == 1:
        return nn.Linear(h, 1)
    return nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=LN_EPS), nn.Linear(h, 1))


def _vcr_head(h: int) -> nn.Sequential:
    """ReLU, not GELU, between the layers (UNITER's VCR head)."""
    return nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.LayerNorm(2 * h, eps=LN_EPS), nn.Linear(2 * h, 2))


class UniterForFinetuning(nn.Module):
    """UNITER backbone (`uniter.*`) + the head of `head.task`.

    `config` is the task's backbone config (`task_model_config`): for VCR its vocab_size
    includes the extra words. Heads are registered after the backbone, as in UNITER.
    """

    def __init__(self, cfg: ModelConfig, head: HeadConfig) -> None:
        super().__init__()
        self.head = head
        self.config = task_model_config(cfg, head)
        self.uniter = UniterModel(self.config)
        h = self.config.hidden_size
        self._add_head(h)
        for name, module in self.named_children():
            if name != "uniter":  # the backbone initialised itself
                module.apply(lambda m: init_bert_weights(m, self.config.initializer_range))
        if head.paired_attn:
            for attn in (self.attn1, self.attn2):
                # Torch's MultiheadAttention init for the packed projection; out_proj keeps
                # UNITER's N(0, 0.02) from the pass above.
                nn.init.xavier_uniform_(attn.in_proj_weight)
                nn.init.zeros_(attn.in_proj_bias)
        uniter = self.uniter
        register_shared_parameters([(uniter, uniter.embeddings.token_type_embeddings.weight),
                                    (uniter.img_embeddings, uniter.img_embeddings.mask_embedding.weight)])

    def _add_head(self, h: int) -> None:
        task, cfg = self.head.task, self.config
        if task in ("vqa", "ve"):
            self.vqa_output = _vqa_head(h, self.head.num_answers)
        elif task == "retrieval":
            self.itm_output = nn.Linear(h, 2)  # loaded from pretraining; seeds rank_output
            self.rank_output = nn.Linear(h, 1)
        elif task == "nlvr2" and self.head.nlvr2_variant == "paired-attn":
            p_att = cfg.attention_probs_dropout_prob
            self.attn1 = nn.MultiheadAttention(h, cfg.num_attention_heads, dropout=p_att, batch_first=True)
            self.attn2 = nn.MultiheadAttention(h, cfg.num_attention_heads, dropout=p_att, batch_first=True)
            self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(cfg.hidden_dropout_prob))
            self.attn_pool = AttentionPool(h, p_att)
            self.nlvr2_output = nn.Linear(2 * h, 2)
        elif task == "nlvr2":
            self.nlvr2_output = nn.Linear(2 * h if self.head.nlvr2_variant == "paired" else h, 2)
        elif task == "re":
            self.re_output = _re_head(h, self.head.re_mlp)
        else:
            assert task == "vcr", task
            self.vcr_output = _vcr_head(h)

    def head_prefixes(self) -> tuple[str, ...]:
        """Top-level names of the head modules (every state-dict key outside `uniter.`)."""
        return tuple(name for name, _ in self.named_children() if name != "uniter")

    # ------------------------------------------------------------------ running

    def forward(self, batch: dict, fn: Callable, *args):
        """`fn(self, batch, *args)` inside the module the engine wraps (trainer/objectives/downstream.py).

        A training function's `TaskResult` gets an exact-zero term touching the parameters the
        task does not reach; an eval function's tensor is returned as is.
        """
        result = fn(self, self._cast_features(batch), *args)
        if hasattr(result, "losses"):
            zero = self._zero_for_unreached(batch["input_ids"].device)
            result.losses = {name: loss + zero for name, loss in result.losses.items()}
        return result

    def _zero_for_unreached(self, device: torch.device) -> Tensor:
        """0 x (each parameter the task's forward never reads, on a zero input): an exact 0.

        ZeRO-3 keeps the stale gradient of a parameter outside the step's graph (see
        UniterForPretraining._zero_for_unreached); with this term every parameter is in every
        step's graph. Unreached: the region mask embedding (pretraining only), retrieval's
        itm_output, and the pooler where the head reads token states (RE, NLVR2 paired-attn).
        Modules are called, not their weights read, so ZeRO-3 gathers them.
        """
        dtype = self.uniter.embeddings.word_embeddings.weight.dtype
        x = torch.zeros(1, self.config.hidden_size, dtype=dtype, device=device)  # [1, H]
        mask_row = torch.ones(1, dtype=torch.long, device=device)  # [1]
        outputs = [self.uniter.img_embeddings.mask_embedding(mask_row)]
        if self.head.task == "retrieval":
            outputs.append(self.itm_output(x))
        if self.head.task == "re" or self.head.paired_attn:
            outputs.append(self.uniter.pooler.dense(x))
        return sum(o.float().sum() for o in outputs) * 0.0

    def _cast_features(self, batch: dict) -> dict:
        return cast_region_features(batch, self.uniter.img_embeddings.img_linear.weight.dtype)

    def encode(self, batch: Mapping[str, Optional[Tensor]]) -> Tensor:
        """Collated task batch -> last hidden states [B, L, H], with its type ids when present."""
        missing = [k for k in _FINETUNE_KEYS if batch.get(k) is None]
        if missing:
            raise ValueError(f"batch is missing {missing}; task collates give {_FINETUNE_KEYS} (docs/downstream.md)")
        if batch.get("pack_index") is not None:
            raise ValueError("downstream heads read [B, L, H] rows; do not pack fine-tuning batches")
        return self.uniter(
            batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"],
            batch["attn_masks"], batch["gather_index"],
            txt_type_ids=batch.get("txt_type_ids"), img_type_ids=batch.get("img_type_ids"),
        )

    def pooled(self, hidden: Tensor) -> Tensor:
        """hidden [B, L, H] -> tanh(Linear(h[:, 0])) [B, H]."""
        return self.uniter.pooled(hidden)

    # ------------------------------------------------------------------ heads

    def vqa_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, L, H] -> answer logits [B, A] (VE: A = 3)."""
        return self.vqa_output(self.pooled(hidden))

    def rank_scores(self, hidden: Tensor) -> Tensor:
        """hidden [R, L, H] -> raw match scores [R, 1]."""
        return self.rank_output(self.pooled(hidden))

    def nlvr2_logits(self, hidden: Tensor, attn_masks: Tensor) -> Tensor:
        """hidden [2n, L, H] (paired, paired-attn; rows interleaved ex0-L, ex0-R, ...) or [n, L, H]
        (triplet), attn_masks [rows, L] -> logits [n, 2]."""
        variant = self.head.nlvr2_variant
        if variant == "triplet":
            return self.nlvr2_output(self.pooled(hidden))
        if hidden.size(0) % 2:
            raise ValueError(f"NLVR2 {variant} batches hold 2 rows per example, got {hidden.size(0)} rows")
        if variant == "paired":
            pooled = self.pooled(hidden)  # [2n, H]
            # Interleaved rows make this view [ex_i-L | ex_i-R] per example.
            return self.nlvr2_output(pooled.view(pooled.size(0) // 2, -1))  # [n, 2]
        return self._paired_attn_logits(hidden, attn_masks)

    def _paired_attn_logits(self, hidden: Tensor, attn_masks: Tensor) -> Tensor:
        two_n, length, h = hidden.shape
        n = two_n // 2
        # Row 2i is example i's left image, 2i+1 its right: the view puts them side by side.
        left, right = hidden.reshape(n, 2 * length, h).chunk(2, dim=1)  # [n, L, H] each
        left_pad, right_pad = (attn_masks == 0).reshape(n, 2 * length).chunk(2, dim=1)  # [n, L] each
        l2r, _ = self.attn1(left, right, right, key_padding_mask=right_pad, need_weights=False)  # [n, L, H]
        r2l, _ = self.attn2(right, left, left, key_padding_mask=left_pad, need_weights=False)  # [n, L, H]
        left = self.fc(torch.cat([l2r, left], dim=-1))  # [n, L, H]
        right = self.fc(torch.cat([r2l, right], dim=-1))  # [n, L, H]
        pooled = torch.cat([self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)], dim=-1)  # [n, 2H]
        return self.nlvr2_output(pooled)  # [n, 2]

    def re_scores(self, hidden: Tensor, txt_lens: Tensor, obj_masks: Tensor) -> Tensor:
        """hidden [n, L, H], txt_lens [n], obj_masks [n, N] (True = pad region) -> fp32 region
        scores [n, N], -1e4 at pads (not -inf: pads never win an argmax, and the CE stays finite)."""
        regions = region_states(hidden, txt_lens, obj_masks)  # [n, N, H]
        # fp32 before the fill: bf16 would round the pad value to -9984.
        scores = self.re_output(regions).squeeze(-1).float()  # [n, N]
        return scores.masked_fill(obj_masks, MASK_VALUE)

    def vcr_logits(self, hidden: Tensor) -> Tensor:
        """hidden [4q, L, H] -> [4q, 2]; column 1 scores the choice."""
        return self.vcr_output(self.pooled(hidden))


def region_states(hidden: Tensor, txt_lens: Tensor, obj_masks: Tensor) -> Tensor:
    """Region states at packed positions [txt_len, txt_len + nbb), zero-padded to N.

    hidden [n, L, H], txt_lens [n], obj_masks [n, N] (True = pad) -> [n, N, H]. One gather
    from device tensors: no host sync on the lengths.
    """
    n, length, h = hidden.shape
    if obj_masks.dim() != 2 or obj_masks.size(0) != n:
        raise ValueError(f"obj_masks must be [n, max_nbb] with n = {n} rows, got {tuple(obj_masks.shape)}")
    txt_lens = torch.as_tensor(txt_lens, device=hidden.device).view(n, 1)  # [n, 1]
    offsets = torch.arange(obj_masks.size(1), device=hidden.device)  # [N]
    # Pad slots may point past the row; they are clamped for the gather, then zeroed.
    index = (txt_lens + offsets).clamp_max(length - 1)  # [n, N]
    states = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, h))  # [n, N, H]
    return states.masked_fill(obj_masks.unsqueeze(-1), 0.0)
