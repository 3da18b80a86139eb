"""Build the shipped demo vocabulary `data/vocab/demo-vocab.txt`.

A WordPiece model is trained with the `tokenizers` library (cased, BERT
normaliser and pre-tokeniser) on every caption the demo generator can produce,
with all printable ASCII as initial alphabet. The trainer breaks ties between
equally frequent merges by hash-map order, which changes between processes, so
its intermediate merge pieces are not reproducible. The file therefore keeps
only the reproducible part of the result, in a canonical order:

    ids 0..4   [PAD] [UNK] [CLS] [SEP] [MASK]
    then       the 94 printable ASCII characters by code point ('!' first, id 5)
    then       '##' + every ASCII letter and digit (so any ASCII word tokenizes without [UNK])
    then       every caption word, sorted (each a single word piece)

`python -m data.vocab [out_path]` rewrites the file.
"""
from __future__ import annotations

import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from data.demo_scenes import all_demo_captions
from data.tokenizer import SPECIAL_TOKENS

DEMO_VOCAB_PATH = Path(__file__).parent / "vocab" / "demo-vocab.txt"
ALPHABET = sorted(string.ascii_letters + string.digits + string.punctuation)
CONTINUATIONS = ["##" + c for c in sorted(string.ascii_letters + string.digits)]


def _bert_wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def train_wordpiece(corpus: list[str]) -> dict[str, int]:
    """Train a cased WordPiece vocabulary on `corpus` until no merge is left."""
    tok = _bert_wordpiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=1_000_000,  # an upper bound only: training stops when every word is whole
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=ALPHABET,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.get_vocab()


def caption_words(corpus: list[str]) -> list[str]:
    """The distinct pre-tokenised words of `corpus`, sorted."""
    pre = pre_tokenizers.BertPreTokenizer()
    return sorted({w for line in corpus for w, _ in pre.pre_tokenize_str(line)})


def build_demo_vocab(out_path: str | Path = DEMO_VOCAB_PATH) -> list[str]:
    """Write the demo vocabulary to `out_path` (deterministic) and return its tokens in id order."""
    corpus = list(all_demo_captions())
    trained = train_wordpiece(corpus)
    words = caption_words(corpus)
    split_words = [w for w in words if w not in trained]
    if split_words:  # the trainer ran out of vocab_size or min_frequency dropped a word
        raise RuntimeError(f"WordPiece training left caption words split: {split_words}")
    tokens = list(SPECIAL_TOKENS) + ALPHABET + CONTINUATIONS
    seen = set(tokens)
    tokens += [w for w in words if w not in seen]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return tokens


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_VOCAB_PATH
    print(f"wrote {len(build_demo_vocab(path))} tokens to {path}")
