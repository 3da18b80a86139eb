"""UNITER single-stream encoder: text + region embeddings, packed, BERT encoder
(docs/models.md, "UNITER model")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from trainer.models.bert import LN_EPS, Encoder, init_bert_weights
from trainer.models.config import ModelConfig

TEXT_TYPE, IMAGE_TYPE = 0, 1


class TextEmbeddings(nn.Module):
    """`LN(word[ids] + pos[position_ids] + type[0])`, dropout; `type[txt_type_ids]` in place of
    type[0] when given (downstream tasks, docs/downstream.md). `padding_idx`: a word row that gets no
    gradient (ALBEF's [PAD], as its Hugging Face BertEmbeddings; UNITER's code has none)."""

    def __init__(self, cfg: ModelConfig, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, padding_idx=padding_idx)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        # Shared with the image embeddings (row 1), as in UNITER.
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor, txt_type_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids [B, Lt], position_ids [1, Lt], txt_type_ids [B, Lt] or None -> [B, Lt, H]."""
        if txt_type_ids is None:
            # The constant row, not a lookup of zeros: pretraining's numbers depend on these exact ops.
            type_emb = self.token_type_embeddings.weight[TEXT_TYPE]  # [H]
        else:
            _check_same_shape("txt_type_ids", txt_type_ids, "input_ids", input_ids)
            type_emb = self.token_type_embeddings(txt_type_ids)  # [B, Lt, H]
        emb = (
            self.word_embeddings(input_ids)  # [B, Lt, H]
            + self.position_embeddings(position_ids)  # [1, Lt, H]
            + type_emb
        )
        return self.dropout(self.LayerNorm(emb))


class ImageEmbeddings(nn.Module):
    """`LN(LN_img(img_linear(f)) + LN_pos(pos_linear(p)) + type[1])`, dropout.

    Attribute registration order follows UNITER's state-dict key order.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.img_linear = nn.Linear(cfg.img_dim, h)
        self.img_layer_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.pos_layer_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.pos_linear = nn.Linear(7, h)
        # Lives in feature space: row 1 is the learned [MASK] feature added to
        # masked (zeroed) regions. Row 0 exists only for checkpoint compatibility;
        # UNITER keeps it at zero, so reading it would be a no-op at best.
        self.mask_embedding = nn.Embedding(2, cfg.img_dim)
        self.LayerNorm = nn.LayerNorm(h, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        type_emb: Tensor,
        img_masks: Optional[Tensor] = None,
    ) -> Tensor:
        """img_feat [B, Ni, D], img_pos_feat [B, Ni, 7], type_emb [H] (one type for all regions) or
        [B, Ni, H] (per-region types), img_masks [B, Ni] -> [B, Ni, H]."""
        if img_masks is not None:
            m = img_masks[..., None].to(img_feat.dtype)  # [B, Ni, 1]
            img_feat = img_feat + m * self.mask_embedding.weight[1]  # [B, Ni, D]
        feat = self.img_layer_norm(self.img_linear(img_feat))  # [B, Ni, H]
        pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))  # [B, Ni, H]
        return self.dropout(self.LayerNorm(feat + pos + type_emb))


class Pooler(nn.Module):
    """`tanh(dense(h[:, 0]))` on the [CLS] state."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor, cls_index: Optional[Tensor] = None) -> Tensor:
        """hidden [B, L, H] -> [B, H]; packed rows [R, Lp, H] hold several samples per row, so
        their [CLS] states are read at the flat positions `cls_index` [B] instead of column 0."""
        if cls_index is None:
            return torch.tanh(self.dense(hidden[:, 0]))  # [B, H]
        cls = hidden.reshape(-1, hidden.size(-1)).index_select(0, cls_index)  # [B, H]
        return torch.tanh(self.dense(cls))


class UniterModel(nn.Module):
    """UNITER backbone; state-dict keys are UNITER's `uniter.*` keys without the prefix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.img_embeddings = ImageEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        self.apply(lambda m: init_bert_weights(m, cfg.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        img_feat: Optional[Tensor],
        img_pos_feat: Optional[Tensor],
        attn_masks: Tensor,
        gather_index: Optional[Tensor],
        img_masks: Optional[Tensor] = None,
        pack_index: Optional[Tensor] = None,
        segment_ids: Optional[Tensor] = None,
        txt_type_ids: Optional[Tensor] = None,
        img_type_ids: Optional[Tensor] = None,
    ) -> Tensor:
        """Return the last hidden states [B, L, H] of the packed `[txt_i | img_i | pad]` sequence.

        With `img_feat=None` the input is text only: L = Lt and no gather is done. With
        `pack_index` and `segment_ids` [R, Lp] (data/packing.py) the samples' valid positions
        are moved into R packed rows after embedding, and the result is [R, Lp, H].
        `txt_type_ids` [B, Lt] / `img_type_ids` [B, Ni] index the type table in place of the
        constant type 0 (text) / 1 (regions), e.g. NLVR2's right image (2) or VCR's answer (2, 3)
        (docs/downstream.md); out-of-range ids fail in the embedding lookup.
        """
        txt_emb = self.embeddings(input_ids, position_ids, txt_type_ids)  # [B, Lt, H]
        if img_feat is None:
            _check_same_shape("attn_masks", attn_masks, "input_ids", input_ids)
            return self.encoder(txt_emb, attn_masks)
        if img_pos_feat is None or gather_index is None:
            raise ValueError("img_feat given without img_pos_feat/gather_index; pass all three or none")
        _check_same_shape("gather_index", gather_index, "attn_masks", attn_masks)
        type_emb = self._image_type_embeddings(img_feat, img_type_ids)  # [H] or [B, Ni, H]
        img_emb = self.img_embeddings(img_feat, img_pos_feat, type_emb, img_masks)  # [B, Ni, H]
        # UNITER's gather trick: text and regions are padded separately; one
        # gather moves each example's regions right after its own text so the
        # sequence has no holes and padding only sits at the end.
        emb = torch.cat([txt_emb, img_emb], dim=1)  # [B, Lt + Ni, H]
        if pack_index is not None or segment_ids is not None:
            packed_rows = _pack(emb, gather_index, pack_index, segment_ids)  # [R, Lp, H]
            return self.encoder(packed_rows, None, segment_ids=segment_ids)
        index = gather_index.unsqueeze(-1).expand(-1, -1, emb.size(-1))  # [B, L, H]
        packed = torch.gather(emb, 1, index)  # [B, L, H]
        return self.encoder(packed, attn_masks)

    def _image_type_embeddings(self, img_feat: Tensor, img_type_ids: Optional[Tensor]) -> Tensor:
        """The constant region type row [H] (pretraining's exact ops), or per-region rows [B, Ni, H]."""
        if img_type_ids is None:
            return self.embeddings.token_type_embeddings.weight[IMAGE_TYPE]  # [H]
        if img_type_ids.shape != img_feat.shape[:2]:
            raise ValueError(
                f"img_type_ids has shape {tuple(img_type_ids.shape)} but img_feat has "
                f"{tuple(img_feat.shape[:2])} regions; both must be [B, Ni]"
            )
        return self.embeddings.token_type_embeddings(img_type_ids)  # [B, Ni, H]

    def pooled(self, hidden: Tensor, cls_index: Optional[Tensor] = None) -> Tensor:
        """hidden [B, L, H] (or packed rows [R, Lp, H] with `cls_index` [B]) -> pooled [CLS] [B, H]."""
        return self.pooler(hidden, cls_index)


def _pack(emb: Tensor, gather_index: Tensor, pack_index: Optional[Tensor],
          segment_ids: Optional[Tensor]) -> Tensor:
    """Per-sample embeddings [B, Lt + Ni, H] -> packed rows [R, Lp, H] in one index_select: packed
    slot (r, p) reads the per-sample position pack_index[r, p] = i * L + j, which the gather
    trick would have filled from emb[i, gather_index[i, j]]."""
    if pack_index is None or segment_ids is None:
        raise ValueError("packed rows need both pack_index and segment_ids (data/packing.py); pass both or none")
    _check_same_shape("pack_index", pack_index, "segment_ids", segment_ids)
    b, width, h = emb.shape
    starts = torch.arange(b, device=emb.device)[:, None] * width  # [B, 1]
    source = (gather_index + starts).reshape(-1).index_select(0, pack_index.reshape(-1))  # [R * Lp]
    return emb.reshape(-1, h).index_select(0, source).view(*pack_index.shape, h)


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; "
            "both must be [B, L] (or [R, Lp] for packed rows) over the same sequence"
        )


def cast_region_features(batch: dict, dtype: torch.dtype) -> dict:
    """`batch` with img_feat / img_pos_feat in `dtype`: region features arrive as fp32, and under
    bf16/fp16 engines they follow the weights."""
    out = dict(batch)
    for key in ("img_feat", "img_pos_feat"):
        if out.get(key) is not None and out[key].dtype != dtype:
            out[key] = out[key].to(dtype)
    return out
