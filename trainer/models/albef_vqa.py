"""ALBEF's generative VQA model (docs/downstream.md, "ALBEF VQA"), as ALBEF's `model_vqa.ALBEF`: the image
encoder and the text encoder in multimodal mode give the question's states; an answer decoder (BERT's
`BertLMHeadModel`: fusion_layers layers of causal self-attention, cross-attention to the question's states
and an MLM head tied to its own word embeddings) scores answers token by token. Its teacher is an fp32 EMA
copy of the whole model (trainer/models/albef_classifier.py, `MomentumCopy`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from trainer.models.albef import TextEncoder, vision_transformer, vit_tokens
from trainer.models.bert import causal_attention_mask, extended_attention_mask
from trainer.models.config import AlbefConfig
from trainer.models.sharing import register_shared_parameters
from trainer.objectives.albef import answer_token_losses, first_token_candidates, reranked_answer_scores


class AlbefVqa(nn.Module):
    """`forward(batch, task, *args)` runs `task(self, batch, *args)` inside the module the engine wraps."""

    TEACHER_PARTS = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        if cfg.vision_width != cfg.hidden_size:
            raise ValueError(f"ALBEF VQA's answer decoder starts from the fusion layers, whose cross-attention reads "
                             f"model.vision_width={cfg.vision_width} image features; its own reads the question's "
                             f"model.hidden_size={cfg.hidden_size} states: the two must be equal")
        self.config = cfg
        self.visual_encoder = vision_transformer(cfg)
        self.text_encoder = TextEncoder(cfg, mlm_head=False)
        self.text_decoder = TextEncoder(cfg, mlm_head=True, text_layers=0, context_width=cfg.hidden_size)
        decoder = self.text_decoder
        register_shared_parameters([(decoder.cls, decoder.embeddings.word_embeddings.weight)])

    def forward(self, batch: dict, task: Callable, *args):
        return task(self, batch, *args)

    def question_states(self, batch: dict) -> Tensor:
        """[B, Lq, H]: the question fused with its picture."""
        image = vit_tokens(self.visual_encoder, batch["pixels"], self.text_decoder.cls.predictions.bias.dtype)
        text = self.text_encoder.text(batch["input_ids"], batch["attn_mask"])  # [B, Lq, H]
        return self.text_encoder.fuse(text, batch["attn_mask"], image)

    def decode(self, states: Tensor, question_mask: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
        """[n, La, V] fp32 next-token logits of n answers, answer i reading question states [n, Lq, H]."""
        dec = self.text_decoder
        positions = torch.arange(answer_ids.size(1), device=answer_ids.device)[None]  # [1, La]
        hidden = dec.embeddings(answer_ids, positions)  # [n, La, H]
        mask = causal_attention_mask(answer_mask, hidden.dtype)  # [n, 1, La, La]
        cross = extended_attention_mask(question_mask, hidden.dtype)  # [n, 1, 1, Lq]
        for layer in dec.fusion:
            hidden = layer(hidden, mask, states, cross)
        return dec.cls(hidden, dec.embeddings.word_embeddings.weight).float()

    def logits(self, batch: dict) -> Tensor:
        """Training: [N, La, V] logits of the batch's N answers, each with its question's states."""
        states = self.question_states(batch)  # [B, Lq, H]
        owner = batch["answer_owner"]  # [N]
        return self.decode(states[owner], batch["attn_mask"][owner], batch["answer_ids"], batch["answer_mask"])

    @torch.no_grad()
    def ranked_scores(self, batch: dict, answer_ids: Tensor, answer_mask: Tensor, k: int) -> Tensor:
        """[B, A] scores of the A candidate answers ([A, La] `[CLS] a [SEP]`): ALBEF's ranking, -inf outside
        each question's k most likely first tokens (trainer/objectives/albef.py)."""
        states, question_mask = self.question_states(batch), batch["attn_mask"]
        b = states.size(0)
        answer_ids, answer_mask = answer_ids.to(states.device), answer_mask.to(states.device)
        start = answer_ids[:1, :1].expand(b, 1)  # [B, 1]: [CLS]
        first = self.decode(states, question_mask, start, torch.ones_like(start))[:, 0]  # [B, V]
        top_probs, top_ids = first_token_candidates(first, answer_ids, k)  # [B, k]
        rows = torch.arange(b, device=states.device).repeat_interleave(top_ids.size(1))  # [B k]
        ids, mask = answer_ids[top_ids.reshape(-1)], answer_mask[top_ids.reshape(-1)]  # [B k, La]
        loss = answer_token_losses(self.decode(states[rows], question_mask[rows], ids, mask), ids, mask)
        scores = reranked_answer_scores(top_probs, loss.view(b, -1))  # [B, k]
        return torch.full((b, answer_ids.size(0)), float("-inf"), device=states.device).scatter(1, top_ids, scores)
