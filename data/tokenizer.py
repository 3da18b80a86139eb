"""Word-piece tokenizer over a local BERT vocabulary file (no hub downloads).

UNITER tokenizes with bert-base-cased: no lower-casing, and MLM's random
replacements are drawn from `[id('!'), V)`, i.e. everything after the special
tokens. This wrapper exposes exactly those ids.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Sequence

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _count_vocab_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


def _load_backend(path: Path) -> BertTokenizerFast:
    # transformers 5 renamed `vocab_file` to `vocab` and silently ignores the
    # old keyword (leaving a specials-only vocabulary), so pick by signature.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    return BertTokenizerFast(**{key: str(path)}, do_lower_case=False)


class Tokenizer:
    """Cased BERT word-piece tokenizer with the ids UNITER's objectives need."""

    def __init__(self, vocab_path: str | Path) -> None:
        path = Path(vocab_path)
        if not path.is_file():
            raise ValueError(
                f"vocabulary file not found: {path} (expected a BERT vocab.txt, one token per line; "
                "the demo vocabulary is data/vocab/demo-vocab.txt)"
            )
        self.path = path
        self._tok = _load_backend(path)
        self._vocab: dict[str, int] = self._tok.get_vocab()
        expected = _count_vocab_lines(path)
        if len(self._vocab) != expected:
            raise ValueError(
                f"{path}: loaded {len(self._vocab)} tokens but the file has {expected} lines "
                "(duplicate tokens, or an incompatible transformers version)"
            )
        missing = [t for t in SPECIAL_TOKENS if t not in self._vocab]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self._vocab["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self._vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self._vocab["[MASK]"]

    @property
    def first_random_id(self) -> int:
        """Start of MLM's random-replacement range `[id('!'), V)` (UNITER)."""
        if "!" not in self._vocab:
            raise ValueError(
                f"{self.path}: token '!' is not in the vocabulary, so the MLM random-replacement "
                "range [id('!'), V) is undefined"
            )
        return self._vocab["!"]

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, or None when absent (no [UNK] fallback)."""
        return self._vocab.get(token)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text` as strings (for inspection and tests)."""
        return self._tok.tokenize(text)

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of `text`, WITHOUT [CLS]/[SEP] (collate adds them)."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are kept so masked inputs stay readable."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=8)
def _load_cached(resolved: str) -> Tokenizer:
    return Tokenizer(resolved)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer for `path`, built once per (resolved) path and then shared."""
    return _load_cached(str(Path(path).expanduser().resolve()))
