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

`train_tokenizer` (`vlpt vocab train`) trains a WordPiece tokenizer of a chosen size on a user's own
captions and saves it as a Hugging Face tokenizer directory for data.tokenizer.path.
"""
from __future__ import annotations

import json
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


# ---------------------------------------------------------------- `vlpt vocab train`

MODEL_MAX_LENGTH = 512
"""Longest input the saved tokenizer declares (BERT's positions); the run's limit is data.max_txt_len."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _caption_lines(path: Path, skipped: Counter) -> Iterator[str]:
    """Captions of a text file, one per line: the caption after the first tab of a .tsv line
    (`image_path<TAB>caption`, as `vlpt shards tsv` reads), a {"caption": ...} object per line of a
    .jsonl, the whole line otherwise. Blank lines are ignored; unusable ones counted by reason."""
    from data.builders import text_lines

    for _, line in text_lines(path, skipped):
        if path.suffix == ".tsv":
            _, sep, line = line.partition("\t")
            if not sep:
                skipped["bad_line"] += 1
                continue
        elif path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not (isinstance(obj, dict) and isinstance(obj.get("caption"), str)):
                skipped["bad_line"] += 1
                continue
            line = obj["caption"]
        yield line


def read_caption_files(paths: Sequence[str | Path], skipped: Counter) -> Iterator[str]:
    """Every usable caption of `paths`, by extension: .json as `vlpt shards` reads captions (COCO
    captions or a list of {image_id, caption}), .jsonl, .tsv, else plain text one caption a line.
    Captions the training reader would skip (`caption_reason`) are counted in `skipped`, not yielded."""
    from data.builders import load_captions
    from data.shards import caption_reason

    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"--captions: file not found: {p}")
    for p in map(Path, paths):
        if p.suffix == ".json":
            entries, _, bad = load_captions(p)  # checked by the same rules already
            skipped.update(bad)
            yield from (caption for _, caption, _ in entries)
            continue
        for caption in _caption_lines(p, skipped):
            reason = caption_reason(caption)
            if reason:
                skipped[reason] += 1
            else:
                yield caption


def _wordpiece_trainer_model(lowercase: bool) -> Tokenizer:
    """An untrained BERT WordPiece pipeline: BertNormalizer (lower-casing and accent stripping as
    BERT's do_lower_case), BertPreTokenizer, `[CLS] text [SEP]` for Hugging Face users."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(captions: Sequence[str | Path], size: int, out: str | Path, lowercase: bool,
                    min_frequency: int = 2, force: bool = False) -> dict:
    """Train a WordPiece tokenizer of about `size` word pieces on the caption files and save it to
    `out` as a Hugging Face tokenizer directory (tokenizer.json, vocab.txt, tokenizer_config.json with
    do_lower_case and model_max_length); a summary dict. Ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK],
    and the printable ASCII characters are always in it, so no ASCII word becomes [UNK]. Equally
    frequent merges are ordered by the trainer's hash maps, so two trainings may differ slightly."""
    if size <= len(SPECIAL_TOKENS) + len(ALPHABET):
        raise ValueError(f"--size {size}: give more than the {len(SPECIAL_TOKENS)} special tokens and "
                         f"{len(ALPHABET)} ASCII characters every vocabulary holds (BERT's: 28,996 / 30,522)")
    if min_frequency < 1:
        raise ValueError(f"--min-frequency must be >= 1, got {min_frequency}")
    out = Path(out)
    if not force and any((out / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"--out {out} already holds a tokenizer; pass --force to replace it")
    skipped: Counter = Counter()
    counted = Counter()

    def corpus() -> Iterator[str]:
        for caption in read_caption_files(captions, skipped):
            counted["captions"] += 1
            yield caption

    alphabet = sorted({c.lower() for c in ALPHABET}) if lowercase else ALPHABET
    trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                        continuing_subword_prefix="##", show_progress=False)
    tok = _wordpiece_trainer_model(lowercase)
    tok.train_from_iterator(corpus(), trainer)
    if not counted["captions"]:
        raise ValueError(f"--captions: no usable caption in {', '.join(map(str, captions))} (skipped: "
                         f"{dict(skipped) or 'none'})")
    size = _save_directory(tok, out, lowercase)
    return {"out": str(out.resolve()), "vocab_size": size, "captions": counted["captions"], "lowercase": lowercase,
            "skipped": dict(sorted(skipped.items()))}


def _save_directory(tok: Tokenizer, out: Path, lowercase: bool) -> int:
    """Save the trained `tok` as a Hugging Face tokenizer directory (adds BERT's `[CLS] text [SEP]`
    post-processor for Hugging Face users); its number of word pieces."""
    from transformers import BertTokenizerFast

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and tokens[:5] == list(SPECIAL_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=MODEL_MAX_LENGTH,
                      unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                      mask_token="[MASK]").save_pretrained(str(out))
    # transformers 5 saves no vocab.txt; it is what a vocab.txt reader (and transformers 4) takes.
    (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return len(tokens)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_VOCAB_PATH
    print(f"wrote {len(build_demo_vocab(path))} tokens to {path}")
