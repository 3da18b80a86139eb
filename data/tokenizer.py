"""Word-piece tokenizer from local files only (no hub downloads): a BERT `vocab.txt` with an explicit
lower-casing choice, or a Hugging Face tokenizer directory (docs/data.md, "Tokenizer").

Both become one `Tokenizer`, the interface the rest of the code uses: the ids of [PAD], [UNK],
[CLS], [SEP] and [MASK], `vocab_size`, and `encode` without [CLS]/[SEP] (collate adds them).
UNITER tokenizes with bert-base-cased (no lower-casing) and draws MLM's random replacements from
`[id('!'), V)`, i.e. everything after the special tokens; ALBEF uses bert-base-uncased.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Optional, Sequence

from transformers import BertTokenizerFast

from data.config import TokenizerConfig

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens, in the id order of the demo vocabulary and of `vlpt vocab train`."""
_SPECIAL_ATTRS = {"[PAD]": "pad_token", "[UNK]": "unk_token", "[CLS]": "cls_token", "[SEP]": "sep_token",
                  "[MASK]": "mask_token"}
"""Our name of each special token -> the Hugging Face tokenizer attribute that names it there."""


def _count_vocab_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


def _from_vocab_file(path: Path, lowercase: bool):
    """BertTokenizerFast over `path`; checks that every line became one token."""
    # transformers 5 renamed `vocab_file` to `vocab` and silently ignores the
    # old keyword (leaving a specials-only vocabulary), so pick by signature.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    backend = BertTokenizerFast(**{key: str(path)}, do_lower_case=lowercase)
    expected = _count_vocab_lines(path)
    if len(backend.get_vocab()) != expected:
        raise ValueError(f"{path}: loaded {len(backend.get_vocab())} tokens but the file has {expected} lines "
                         "(duplicate tokens, or an incompatible transformers version)")
    return backend


def _from_directory(path: Path):
    """AutoTokenizer over a local directory, as a fast (Rust `tokenizers`) tokenizer."""
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # no tokenizer files, or ones it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable Hugging Face tokenizer directory ({first}); expected tokenizer.json "
                         "or vocab.txt with tokenizer_config.json (`vlpt vocab train` writes one)") from None
    if not getattr(backend, "is_fast", False):
        raise ValueError(f"{path}: only a slow (Python) tokenizer could be loaded; give a directory with a "
                         "tokenizer.json (a fast tokenizer)")
    return backend


def _lowercases(backend) -> bool:
    """Whether the backend's normaliser lower-cases (BERT uncased), asked of the normaliser itself."""
    normalizer = backend.backend_tokenizer.normalizer
    return normalizer is not None and normalizer.normalize_str("AB") == "ab"


class Tokenizer:
    """A fast word-piece tokenizer with the special-token ids UNITER's and ALBEF's objectives need.

    `Tokenizer(path, lowercase)`: `path` a vocab.txt (lowercase None = cased) or a Hugging Face
    tokenizer directory (lowercase None = its own setting; a different value is refused).
    """

    def __init__(self, path: str | Path, lowercase: Optional[bool] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._tok = _from_directory(path)
            own = _lowercases(self._tok)
            if lowercase is not None and lowercase != own:
                raise ValueError(f"lowercase={str(lowercase).lower()} but the tokenizer in {path} "
                                 f"{'lower-cases' if own else 'keeps the case'} (its own setting); "
                                 f"give lowercase={str(own).lower()} or leave it out")
        elif path.is_file():
            self._tok = _from_vocab_file(path, bool(lowercase))
        else:
            raise ValueError(f"tokenizer not found: {path} (expected a BERT vocab.txt, one token per line, or a "
                             "Hugging Face tokenizer directory; the demo vocabulary is data/vocab/demo-vocab.txt)")
        self.path = path
        self.lowercase = _lowercases(self._tok)
        self._vocab: dict[str, int] = self._tok.get_vocab()
        self._specials = self._special_ids()
        self._backend = self._tok.backend_tokenizer

    def _special_ids(self) -> dict[str, int]:
        """Our special token name -> its id, from the tokenizer's own special tokens."""
        ids, missing = {}, []
        for ours, attr in _SPECIAL_ATTRS.items():
            token = getattr(self._tok, attr, None)
            token_id = self._vocab.get(str(token)) if token is not None else None
            if token_id is None:
                missing.append(ours)
            else:
                ids[ours] = token_id
        if missing:
            raise ValueError(f"{self.path}: vocabulary lacks the special tokens {missing}")
        return ids

    @property
    def vocab_size(self) -> int:
        """Rows the word embedding needs: every id the tokenizer can produce (added tokens too)."""
        return len(self._tok)

    @property
    def pad_id(self) -> int:
        return self._specials["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self._specials["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self._specials["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._specials["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self._specials["[MASK]"]

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
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of `text`, WITHOUT [CLS]/[SEP] (collate adds them). Asks the Rust
        tokenizer directly: the same ids as the Python wrapper's `encode`, without its length
        warnings (a caption over `model_max_length` is data.max_txt_len's business)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are kept so masked inputs stay readable."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> str:
        """One phrase for logs: where it came from, its size and casing."""
        return f"{self.path} ({self.vocab_size:,} word pieces, {'uncased' if self.lowercase else 'cased'})"

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, lowercase={self.lowercase})"


@functools.lru_cache(maxsize=8)
def _load_cached(resolved: str, lowercase: Optional[bool]) -> Tokenizer:
    return Tokenizer(resolved, lowercase)


def load_tokenizer(path: str | Path, lowercase: Optional[bool] = None) -> Tokenizer:
    """Tokenizer for `path` (see `Tokenizer`), built once per (resolved path, lowercase) and then shared."""
    return _load_cached(str(Path(path).expanduser().resolve()), lowercase)


def tokenizer_from_config(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer `data.tokenizer` names; ValueError naming the key when it cannot be used."""
    path = Path(cfg.path).expanduser()
    if path.is_file() and cfg.lowercase is None:
        raise ValueError(f"data.tokenizer.lowercase: {path} is a vocab.txt, which does not say whether captions "
                         "are lower-cased; set it to false (cased, as bert-base-cased / UNITER) or true "
                         "(uncased, as bert-base-uncased / ALBEF)")
    try:
        return load_tokenizer(path, cfg.lowercase)
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from None
