"""`vlpt pretrain` with a Hugging Face tokenizer directory (docs/data.md, "Tokenizer"): the start-up
caption report, captions over data.max_txt_len filtered apart from bad input, and the vocabulary
checks that come before any work (one line, exit 2)."""
import json
import tarfile

import pytest

from tests.conftest import run_vlpt, write_albef_config, write_tiny_config
from tests.tokenizer_util import TINY_WORDS, hf_vocab_size, write_bert_embeddings, write_hf_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", lowercase=True)


def first_captions(train_dir, n=1000) -> list[str]:
    """The first n captions of the training shards in manifest order, read with tarfile alone."""
    manifest = json.loads((train_dir / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        with tarfile.open(train_dir / shard["path"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json") and len(out) < n:
                    out.append(json.loads(tar.extractfile(member).read())["caption"])
    return out


def assert_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlpt: error:"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_a_run_with_a_tokenizer_directory_reports_and_filters_by_length(tmp_path, demo_data, hf_dir):
    # max_txt_len 8: the 9-word demo captions are dropped by length; max_bad_per_1000 0 would end the
    # run at the first bad sample, so the run finishing shows they are not counted as bad input.
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", tasks={"mlm": 1, "itm": 0},
                            model={"vocab_size": hf_vocab_size()},
                            data={"tokenizer": {"path": str(hf_dir), "lowercase": True}, "max_txt_len": 8, "val": None,
                                  "max_bad_per_1000": 0, "min_samples_for_bad_rate": 1},
                            train={"max_steps": 1})
    proc = run_vlpt(["pretrain", "--config", str(cfg)])
    captions = first_captions(demo_data / "train")
    words = [c.lower().split() for c in captions]  # the tiny tokenizer: one word piece per word
    unk = sum(w not in TINY_WORDS for ws in words for w in ws) / sum(map(len, words))
    over = sum(len(ws) > 8 for ws in words) / len(words)
    assert 0.05 < over and 0.01 < unk  # the data this test needs, checked
    report = [line for line in proc.stderr.splitlines() if "training captions" in line]
    assert len(report) == 1, proc.stderr[-3000:]
    assert f"tokenizer {hf_dir} ({hf_vocab_size()} word pieces, uncased)" in report[0]
    assert f"on the first {len(captions):,} training captions" in report[0]
    assert f"[UNK] {100 * unk:.2f} % of word pieces" in report[0]
    assert f"{100 * over:.1f} % of captions over data.max_txt_len=8 (dropped" in report[0]
    assert "vlpt vocab train" in proc.stderr and "raise data.max_txt_len" in proc.stderr  # both warnings
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_filtered_length"] > 0 and "data_skipped" not in summary
    assert "filtered by length" in proc.stdout


def test_vocab_size_against_the_tokenizer_is_one_line(tmp_path, demo_data, hf_dir):
    # model.vocab_size stays the demo vocabulary's 188
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run",
                            data={"tokenizer": {"path": str(hf_dir), "lowercase": True}})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert_one_line(proc, "model.vocab_size=188", f"data.tokenizer.path={hf_dir} has {hf_vocab_size()} word pieces",
                    f"set model.vocab_size={hf_vocab_size()}")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_vocab_txt_needs_its_casing_and_data_vocab_has_moved(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run")
    proc = run_vlpt(["pretrain", "--config", str(cfg), "--data.tokenizer.lowercase=null"], check=False)
    assert_one_line(proc, "data.tokenizer.lowercase", "demo-vocab.txt is a vocab.txt")
    proc = run_vlpt(["pretrain", "--config", str(cfg), "--data.vocab=data/vocab/demo-vocab.txt"], check=False)
    assert_one_line(proc, "'data.vocab' has moved: use 'data.tokenizer.path'")


@pytest.mark.parametrize("arch", ["uniter", "albef"])
def test_init_from_bert_of_another_vocabulary_is_one_line(tmp_path, demo_data, pixel_data, arch):
    bert = write_bert_embeddings(tmp_path / "bert", rows=30522)
    if arch == "uniter":
        cfg = write_tiny_config(tmp_path / "c.yaml", demo_data, tmp_path / "run", model={"init_from_bert": str(bert)})
    else:
        cfg = write_albef_config(tmp_path, pixel_data, "run", 2, model={"init_from_bert": str(bert)})
    proc = run_vlpt(["pretrain", "--config", str(cfg)], check=False)
    assert_one_line(proc, f"model.init_from_bert={bert} has 30522 word-embedding rows", "model.vocab_size=188",
                    "data.tokenizer.path=")
    assert not (tmp_path / "run").exists()
