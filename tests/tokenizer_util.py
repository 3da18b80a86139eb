"""Tiny Hugging Face tokenizer directories and BERT weight folders, built in the tests themselves."""
from __future__ import annotations

import json
from pathlib import Path

TINY_WORDS = ("a", "an", "is", "of", "red", "blue", "green", "cube", "ball", "cone", "left", "right", "above",
              "below", "next", "to", "there", "and")
"""Some of the demo captions' words: the others (yellow, star, pyramid, ...) become [UNK]."""


def write_hf_tokenizer(out: Path, words=TINY_WORDS, lowercase: bool = True) -> Path:
    """A word-level WordPiece tokenizer directory (tokenizer.json + tokenizer_config.json) made with
    `tokenizers`: ids 0-4 the special tokens, then '!', then `words`; every other word is [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    from data.tokenizer import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "!", *words])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase).save_pretrained(str(out))
    return out


def hf_vocab_size(words=TINY_WORDS) -> int:
    return 5 + 1 + len(words)


def write_bert_embeddings(out: Path, rows: int, hidden: int = 32, declared: int | None = None) -> Path:
    """A BERT folder holding just its word embedding [rows, hidden] (model.safetensors) and a
    config.json declaring `declared` (default: rows) word pieces: enough for the start-up check."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(rows, hidden)}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"vocab_size": rows if declared is None else declared,
                                                 "hidden_size": hidden}))
    return out
