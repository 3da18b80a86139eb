"""Tokenizers (docs/data.md, "Tokenizer"): a vocab.txt with an explicit casing or a Hugging Face
directory behind one interface, `vlpt vocab train`, the start-up caption report, and the length filter
counted apart from bad input."""
import json
import pickle

import numpy as np
import pytest
import torch

from data.config import TokenizerConfig
from data.shards import write_shard
from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_config
from data.tokenizer_report import (MAX_OVER_LEN_RATE, MAX_PIECES_PER_WORD, MAX_UNK_RATE, CaptionStats,
                                   caption_stats, report_lines, shard_captions)
from data.vocab import DEMO_VOCAB_PATH
from tests.tokenizer_util import TINY_WORDS, hf_vocab_size, write_bert_embeddings, write_hf_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", lowercase=True)


# ---------------------------------------------------------------- one interface, two sources

def test_demo_vocabulary_tokenizes_as_bert_tokenizer_fast_did():
    """The demo losses depend on these ids: the same as the cased BertTokenizerFast of before."""
    import inspect

    from transformers import BertTokenizerFast

    from data.demo_scenes import all_demo_captions

    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    ref = BertTokenizerFast(**{key: str(DEMO_VOCAB_PATH)}, do_lower_case=False)
    tok = load_tokenizer(DEMO_VOCAB_PATH)
    captions = list(all_demo_captions())[::50] + ["A Red Cube!", "Ünïcödé café", "[MASK] red", "x" * 300]
    for caption in captions:
        assert tok.encode(caption) == ref.encode(caption, add_special_tokens=False), caption
    assert tok.encode("A Red") != tok.encode("a red")  # cased
    assert not tok.lowercase and tok.vocab_size == 188


def test_vocab_txt_lowercase_is_explicit_and_applied():
    cased, uncased = load_tokenizer(DEMO_VOCAB_PATH, False), load_tokenizer(DEMO_VOCAB_PATH, True)
    assert uncased.encode("A RED Cube") == cased.encode("a red cube") == uncased.encode("a red cube")
    assert uncased.lowercase and uncased.vocab_size == cased.vocab_size
    with pytest.raises(ValueError, match="data.tokenizer.lowercase: .*demo-vocab.txt is a vocab.txt"):
        tokenizer_from_config(TokenizerConfig(path=str(DEMO_VOCAB_PATH)))
    assert tokenizer_from_config(TokenizerConfig(str(DEMO_VOCAB_PATH), lowercase=True)) is uncased


def test_hf_directory_lowercases_with_its_own_special_tokens(hf_dir):
    tok = tokenizer_from_config(TokenizerConfig(path=str(hf_dir)))  # a directory says its casing itself
    assert isinstance(tok, Tokenizer) and tok.lowercase
    assert tok.vocab_size == hf_vocab_size()
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.first_random_id) == (0, 1, 2, 3, 4, 5)
    red, cube = 6 + TINY_WORDS.index("red"), 6 + TINY_WORDS.index("cube")
    assert tok.encode("A RED Cube") == tok.encode("a red cube") == [6, red, cube]
    assert tok.encode("a PURPLE star") == [6, tok.unk_id, tok.unk_id]
    assert tok.tokenize("Red CUBE") == ["red", "cube"]
    assert "uncased" in tok.describe() and str(hf_dir) in tok.describe()
    same = tokenizer_from_config(TokenizerConfig(path=str(hf_dir), lowercase=True))  # the same casing: fine
    assert same.encode("A RED Cube") == tok.encode("A RED Cube")


def test_hf_directory_refuses_another_casing_and_junk(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer: lowercase=false but the tokenizer in .* lower-cases"):
        tokenizer_from_config(TokenizerConfig(path=str(hf_dir), lowercase=False))
    cased = write_hf_tokenizer(tmp_path / "cased", lowercase=False)
    assert load_tokenizer(cased).encode("Red") == [load_tokenizer(cased).unk_id]  # "Red" is not "red"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a loadable Hugging Face tokenizer directory"):
        Tokenizer(empty)
    with pytest.raises(ValueError, match="tokenizer not found"):
        tokenizer_from_config(TokenizerConfig(path=str(tmp_path / "nope"), lowercase=False))


def test_hf_directory_without_a_mask_token_is_refused(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.WordPiece(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4},
                                          unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        Tokenizer(tmp_path / "t")


# ---------------------------------------------------------------- the start-up report

def test_caption_stats_count_pieces_unk_and_over_length(hf_dir):
    tok = load_tokenizer(hf_dir)
    captions = ["a red cube", "A purple star is left of a Blue Ball", "", "an orange disk"]
    stats = caption_stats(captions, tok, max_txt_len=3)
    # word-level vocabulary: one piece per word; unknown words are [UNK] (reference: plain loops)
    words = [c.lower().split() for c in captions if c.split()]
    lengths = [len(w) for w in words]
    unk = sum(1 for ws in words for w in ws if w not in TINY_WORDS)
    assert stats.captions == 3  # the empty caption has no piece: left out, as the decoders skip it
    assert stats.pieces_mean == pytest.approx(np.mean(lengths))
    assert stats.pieces_p95 == pytest.approx(np.percentile(lengths, 95))
    assert stats.pieces_per_word == 1.0
    assert stats.unk_rate == pytest.approx(unk / sum(lengths)) and unk == 4
    assert stats.over_len_rate == pytest.approx(1 / 3)
    assert caption_stats(["", "   "], tok, 3) is None


def test_the_demo_vocabulary_on_real_captions_warns():
    tok = load_tokenizer(DEMO_VOCAB_PATH, False)
    real = ["A man riding a wave on top of a surfboard.", "Two giraffes standing next to each other in a field."]
    stats = caption_stats(real, tok, max_txt_len=60)
    assert stats.pieces_per_word > MAX_PIECES_PER_WORD and stats.unk_rate == 0  # spelled out, never [UNK]
    _, warnings = report_lines(stats, tok.describe(), "dropped")
    assert len(warnings) == 1 and "word pieces per word" in warnings[0]


def test_report_warns_above_the_limits_naming_what_to_do():
    ok = CaptionStats(1000, 11.2, 17.0, pieces_per_word=MAX_PIECES_PER_WORD, unk_rate=MAX_UNK_RATE,
                      over_len_rate=MAX_OVER_LEN_RATE, max_txt_len=60)
    line, warnings = report_lines(ok, "v.txt (188 word pieces, cased)", "dropped")
    assert warnings == [] and "first 1,000 training captions" in line
    assert "11.2 word pieces per caption (p95 17, 2.00 per word)" in line
    assert "[UNK] 1.00 %" in line and "5.0 % of captions over data.max_txt_len=60 (dropped)" in line
    bad = CaptionStats(1000, 40.0, 71.0, pieces_per_word=4.1, unk_rate=0.03, over_len_rate=0.2, max_txt_len=30)
    _, warnings = report_lines(bad, "v.txt", "truncated")
    unk, spelled, over = warnings
    assert "4.1 word pieces per word" in spelled and "vlpt vocab train" in spelled
    assert "[UNK] is 3.0 %" in unk and "vlpt vocab train" in unk and "data.tokenizer.path" in unk
    assert "20.0 % of captions are longer than data.max_txt_len=30" in over and "truncated" in over
    assert "raise data.max_txt_len (p95 here: 71)" in over


def test_shard_captions_read_the_json_of_region_and_picture_shards(tmp_path):
    big = b"\0" * (200 << 10)  # a feature / picture member, passed over unread
    region = [{"__key__": f"r{i}", "json": {"image_id": "i", "caption": f"cap {i}"}, "npz": big} for i in range(5)]
    pictures = [{"__key__": "p0", "json": {"image_id": "i", "captions": ["one", "two\x00bad", "three"]}, "png": big},
                {"__key__": "p1", "json": b"{not json"},
                {"__key__": "p2", "json": {"image_id": "i", "caption": "four"}}]
    write_shard(tmp_path / "a.tar", region)
    write_shard(tmp_path / "b.tar", pictures)
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    shards = [str(tmp_path / "broken.tar"), str(tmp_path / "missing.tar"), str(tmp_path / "a.tar"),
              str(tmp_path / "b.tar")]
    assert shard_captions(shards, 100) == [f"cap {i}" for i in range(5)] + ["one", "three", "four"]
    assert shard_captions(shards, 3) == ["cap 0", "cap 1", "cap 2"]
    assert shard_captions([str(tmp_path / "b.tar")], 1) == ["one"]


# ---------------------------------------------------------------- `vlpt vocab train`

def _demo_caption_files(tmp_path):
    from data.demo_scenes import all_demo_captions

    caps = list(all_demo_captions())[::20]
    json_file = tmp_path / "captions.json"
    json_file.write_text(json.dumps([{"image_id": f"img{i}", "caption": c} for i, c in enumerate(caps)]))
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"caption": "A ZEBRA next to a Giraffe"}\nnot json\n{"caption": 3}\n\n')
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("img/1.jpg\tA yellow giraffe\nno tab here\nimg/2.jpg\tbad \x01 caption\n")
    return caps, [json_file, jsonl, tsv]


def test_vocab_train_round_trip(tmp_path, capsys):
    from transformers import AutoTokenizer

    from vlpt.cli import main

    caps, files = _demo_caption_files(tmp_path)
    out = tmp_path / "tok"
    assert main(["vocab", "train", "--captions", *map(str, files), "--size", "300", "--out", str(out),
                 "--lowercase"]) == 0
    printed = capsys.readouterr().out
    assert f"from {len(caps) + 2} captions" in printed and "(skipped: bad_caption=1, bad_line=3)" in printed
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["model_max_length"] == 512
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 300
    assert f"model.vocab_size={len(vocab)}" in printed

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = load_tokenizer(out)
    caption = "A Red Cube left of a ZEBRA"
    assert ours.lowercase and ours.vocab_size == len(hf) == len(vocab)
    assert ours.encode(caption) == hf.encode(caption, add_special_tokens=False) == ours.encode(caption.lower())
    assert hf.encode(caption)[0] == ours.cls_id and hf.encode(caption)[-1] == ours.sep_id
    assert ours.unk_id not in ours.encode(caption)  # ASCII is always in the alphabet
    assert all(ours.tokenize(w) == [w] for w in ("red", "cube", "left"))  # frequent words are one piece
    # the vocab.txt beside it, read with the same casing, gives the same pieces
    assert load_tokenizer(out / "vocab.txt", True).encode(caption) == ours.encode(caption)


def test_vocab_train_errors_are_one_line(tmp_path, capsys):
    from vlpt.cli import main

    _, files = _demo_caption_files(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [(["--captions", str(tmp_path / "nope.json"), "--size", "300"], "file not found"),
             (["--captions", str(files[0]), "--size", "50"], "--size 50"),
             (["--captions", str(empty), "--size", "300"], "no usable caption")]
    for args, needle in cases:
        assert main(["vocab", "train", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(["vocab", "train", "--captions", str(files[0]), "--size", "300", "--out", str(tmp_path / "o")]) == 0
    assert main(["vocab", "train", "--captions", str(files[0]), "--size", "300", "--out", str(tmp_path / "o")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["vocab", "train", "--captions", str(files[0]), "--size", "300", "--out", str(tmp_path / "o"),
                 "--force"]) == 0


# ---------------------------------------------------------------- length filter, init_from_bert rows

def test_captions_over_max_txt_len_are_filtered_not_bad():
    from data.config import DataConfig
    from trainer.data_health import DataCounts, bad_rate_error, data_metrics

    counts = DataCounts({"caption_too_long": 40, "bad_json": 2}, seen=1000)
    assert counts.bad == 2 and counts.filtered == 40 and counts.bad_skipped == {"bad_json": 2}
    assert counts.per_1000 == 2.0
    metrics = data_metrics(counts)
    assert metrics["data/filtered_length"] == 40 and metrics["data/skipped"] == 2
    assert "data/skipped_caption_too_long" not in metrics and metrics["data/skipped_bad_json"] == 2
    limit = DataConfig(max_bad_per_1000=5, min_samples_for_bad_rate=1)
    assert bad_rate_error(limit, counts) is None  # 42 per 1,000 skipped, but only 2 bad
    error = bad_rate_error(limit, DataCounts({"caption_too_long": 40, "bad_json": 6}, seen=1000))
    assert "6 of 1,000 samples were bad" in error and "caption_too_long" not in error


def test_word_embedding_rows_from_safetensors_and_torch_files(tmp_path):
    from trainer.models.weights import word_embedding_rows

    assert word_embedding_rows(write_bert_embeddings(tmp_path / "st", rows=77)) == 77
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(31, 4)}, pt / "pytorch_model.bin")
    assert word_embedding_rows(pt) == 31
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        word_embedding_rows(tmp_path / "none")
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"encoder.layer.0.weight": torch.zeros(2)}, other / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\[bert.\\]embeddings.word_embeddings.weight"):
        word_embedding_rows(other)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "pytorch_model.bin").write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(ValueError, match="refused to load|cannot read"):
        word_embedding_rows(hostile)
