"""What the tokenizer makes of a dataset's captions, measured at start on the first training captions:
word pieces per caption, the [UNK] rate and the share of captions over data.max_txt_len (docs/data.md,
"Tokenizer report"). A vocabulary that does not match the captions (the 188-piece demo vocabulary on
real captions splits every word into letters) shows here before it costs a run.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from data.shards import caption_reason, iter_shard
from data.storage import S3Options

REPORT_CAPTIONS = 1000
"""Captions the start-up report reads (from the start of the training shards, in manifest order)."""
MAX_UNK_RATE = 0.01
"""Warn above this share of [UNK] among the word pieces."""
MAX_OVER_LEN_RATE = 0.05
"""Warn above this share of captions longer than data.max_txt_len word pieces."""
MAX_PIECES_PER_WORD = 2.0
"""Warn above this many word pieces per whitespace-separated word: a vocabulary that spells the captions
out letter by letter (BERT's vocabularies give about 1.1-1.3 on English captions)."""
CAPTION_MEMBER_BYTES = 64 << 10
"""Members above this size (features, pictures) are passed over unread: only the small JSON is needed."""


@dataclass(frozen=True)
class CaptionStats:
    """What a tokenizer makes of a set of captions."""

    captions: int
    pieces_mean: float
    """Word pieces per caption, without [CLS]/[SEP]."""
    pieces_p95: float
    pieces_per_word: float
    """Word pieces per whitespace-separated word."""
    unk_rate: float
    """Share of all word pieces that are [UNK]."""
    over_len_rate: float
    """Share of captions with more than max_txt_len word pieces."""
    max_txt_len: int


def caption_stats(captions: Iterable[str], tok, max_txt_len: int) -> Optional[CaptionStats]:
    """Statistics of `captions` under `tok` (a data.tokenizer.Tokenizer); None when no caption has a
    word piece. Captions without one are left out, as the decoders skip them ("empty_caption")."""
    lengths, unk, words = [], 0, 0
    for caption in captions:
        ids = np.asarray(tok.encode(caption), dtype=np.int64)  # [T]
        if ids.size:
            lengths.append(ids.size)
            unk += int((ids == tok.unk_id).sum())
            words += len(caption.split())
    if not lengths:
        return None
    n = np.asarray(lengths, dtype=np.float64)  # [C]
    return CaptionStats(captions=len(lengths), pieces_mean=float(n.mean()), pieces_p95=float(np.percentile(n, 95)),
                        pieces_per_word=float(n.sum()) / max(words, 1), unk_rate=unk / float(n.sum()),
                        over_len_rate=float((n > max_txt_len).mean()), max_txt_len=max_txt_len)


def report_lines(stats: CaptionStats, tokenizer: str, over_len_action: str) -> tuple[str, list[str]]:
    """(the report line, warning lines). `tokenizer` names it (Tokenizer.describe()); `over_len_action`
    is what happens to captions over data.max_txt_len: "dropped" (UNITER) or "truncated" (ALBEF)."""
    line = (f"tokenizer {tokenizer} on the first {stats.captions:,} training captions: "
            f"{stats.pieces_mean:.1f} word pieces per caption (p95 {stats.pieces_p95:.0f}, "
            f"{stats.pieces_per_word:.2f} per word), "
            f"[UNK] {100 * stats.unk_rate:.2f} % of word pieces, {100 * stats.over_len_rate:.1f} % of captions "
            f"over data.max_txt_len={stats.max_txt_len} ({over_len_action})")
    warnings = []
    if stats.unk_rate > MAX_UNK_RATE:
        warnings.append(f"[UNK] is {100 * stats.unk_rate:.1f} % of the word pieces (over {100 * MAX_UNK_RATE:g} %): "
                        "the tokenizer does not cover these captions; use the one they were made for, or train "
                        "one on them (`vlpt vocab train --captions FILE --size N --out DIR`, then "
                        "data.tokenizer.path=DIR and model.vocab_size=<its size>)")
    if stats.pieces_per_word > MAX_PIECES_PER_WORD:
        warnings.append(f"{stats.pieces_per_word:.1f} word pieces per word (over {MAX_PIECES_PER_WORD:g}): the "
                        "vocabulary spells these captions out in small pieces (the demo vocabulary does so with "
                        "real captions); use the tokenizer they were made for, or train one on them (`vlpt vocab "
                        "train --captions FILE --size N --out DIR`)")
    if stats.over_len_rate > MAX_OVER_LEN_RATE:
        warnings.append(f"{100 * stats.over_len_rate:.1f} % of captions are longer than data.max_txt_len="
                        f"{stats.max_txt_len} word pieces (over {100 * MAX_OVER_LEN_RATE:g} %) and are "
                        f"{over_len_action}: raise data.max_txt_len (p95 here: {stats.pieces_p95:.0f}), or use "
                        "a tokenizer matching the captions (`vlpt vocab train`) if they split into many pieces")
    return line, warnings


def shard_captions(shards: Sequence[str], limit: int, s3: Optional[S3Options] = None) -> list[str]:
    """Up to `limit` usable captions from the start of `shards` (in order), reading only the JSON
    members (larger members are passed over unread). Samples without a usable caption are passed
    over; a shard that cannot be read (missing, damaged, S3 past its retries) ends the reading of
    that shard only."""
    out: list[str] = []
    for url in shards:
        if len(out) >= limit:
            break
        try:
            for raw in iter_shard(url, s3=s3, max_member_bytes=CAPTION_MEMBER_BYTES):
                out += _captions(raw.get("json"))[:limit - len(out)]
                if len(out) >= limit:
                    break
        except (OSError, ValueError, tarfile.TarError):
            continue  # the loader meets the same shard and counts it by reason
    return out


def _captions(meta: Optional[bytes]) -> list[str]:
    """The captions of a sample's JSON member that the decoders would tokenize: its `caption`
    (region and vlpt-pixels-v1 shards) or each of its `captions` (vlpt-pixels-v2: one picture, its captions)."""
    if meta is None:
        return []
    try:
        obj = json.loads(meta)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return []
    if not isinstance(obj, dict):
        return []
    found = obj.get("captions") if isinstance(obj.get("captions"), list) else [obj.get("caption")]
    return [c for c in found if isinstance(c, str) and caption_reason(c) is None]
