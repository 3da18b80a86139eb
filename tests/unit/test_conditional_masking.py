"""Conditional masking through the real training loaders: each task corrupts at most one modality.

Every batch the run's loaders produce is checked against the clean samples it was
made from (looked up by caption key in the shards): MRM batches (MRFR, MRC, MRC-kl)
carry the full text, MLM batches the full image, ITM batches both.
"""
import numpy as np
import pytest
import torch

from data.shards import decode_region_sample, iter_shard, read_manifest
from data.tokenizer import tokenizer_from_config
from tests.conftest import write_tiny_config
from trainer.config import load_config
from trainer.engine import BatchLayout
from trainer.recipes import recipe_class
from trainer.run_setup import build_train_loaders

TASKS = {"mlm": 1, "mrfr": 1, "mrc": 1, "mrc-kl": 1, "itm": 1, "itm-hard": 1}
BATCHES_PER_TASK = 12


@pytest.fixture(scope="module")
def loaders_and_samples(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    cfg = load_config(str(write_tiny_config(tmp / "c.yaml", demo_data, tmp / "run", tasks=TASKS)))
    tok = tokenizer_from_config(cfg.data.tokenizer)
    loaders = build_train_loaders(cfg, recipe_class(cfg.model.arch)(cfg), tok,
                                  BatchLayout(cfg.data.micro_batch_size, 2, 1), 0, {})
    clean = {}
    for shard in read_manifest(cfg.data.train).shards:
        for raw in iter_shard(shard):
            sample, _ = decode_region_sample(raw, tok, cfg.data.max_txt_len)
            clean[sample.key] = sample
    return loaders, clean, tok


def clean_text(batch, clean, tok, row):
    """[CLS] caption [SEP] of the row's own sample, as the batch pads it: [Lt]."""
    ids = clean[batch["keys"][row]].input_ids
    out = torch.full((batch["input_ids"].size(1),), tok.pad_id, dtype=torch.long)
    out[0], out[1:len(ids) + 1], out[len(ids) + 1] = tok.cls_id, torch.from_numpy(ids), tok.sep_id
    return out


def assert_full_text(batch, clean, tok):
    assert not (batch["input_ids"] == tok.mask_id).any()
    assert "txt_labels" not in batch and "mlm_index" not in batch
    for row in range(len(batch["keys"])):
        assert torch.equal(batch["input_ids"][row], clean_text(batch, clean, tok, row))


def assert_full_image(batch, clean, rows=None):
    assert "img_masks" not in batch and "mrm_index" not in batch
    for row in rows if rows is not None else range(len(batch["keys"])):
        sample = clean[batch["keys"][row]]
        n = len(sample.img_feat)
        assert torch.equal(batch["img_feat"][row, :n], torch.from_numpy(sample.img_feat))
        assert torch.equal(batch["img_pos_feat"][row, :n], torch.from_numpy(sample.img_pos))


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrc-kl"])
def test_mrm_batches_never_mask_text(loaders_and_samples, task):
    loaders, clean, tok = loaders_and_samples
    for _ in range(BATCHES_PER_TASK):
        batch = loaders[task].next()
        assert_full_text(batch, clean, tok)
        masks = batch["img_masks"]  # [B, Ni] bool
        assert masks.any(1).all()  # at least one region masked per image
        for row in range(len(batch["keys"])):
            sample = clean[batch["keys"][row]]
            n = len(sample.img_feat)
            feat = batch["img_feat"][row, :n]
            assert (feat[masks[row, :n]] == 0).all()  # masked rows zeroed ...
            kept = ~masks[row, :n]
            assert torch.equal(feat[kept], torch.from_numpy(sample.img_feat)[kept])  # ... the rest intact
            assert torch.equal(batch["img_pos_feat"][row, :n], torch.from_numpy(sample.img_pos))  # boxes kept


def test_mlm_batches_never_mask_regions(loaders_and_samples):
    loaders, clean, tok = loaders_and_samples
    masked_tokens = 0
    for _ in range(BATCHES_PER_TASK):
        batch = loaders["mlm"].next()
        assert_full_image(batch, clean)
        masked_tokens += int((batch["input_ids"] == tok.mask_id).sum())
    assert masked_tokens > 0  # the text side is corrupted, as it should be


@pytest.mark.parametrize("task", ["itm", "itm-hard"])
def test_itm_batches_mask_nothing(loaders_and_samples, task):
    loaders, clean, tok = loaders_and_samples
    for _ in range(BATCHES_PER_TASK):
        batch = loaders[task].next()
        n_texts = len(batch["keys"])
        assert not (batch["input_ids"] == tok.mask_id).any()
        assert "img_masks" not in batch and "txt_labels" not in batch
        positives = [r for r in range(n_texts) if int(batch["itm_targets"][r]) == 1]
        assert positives
        assert_full_image(batch, clean, rows=positives)
        for row in range(n_texts):
            assert torch.equal(batch["input_ids"][row], clean_text(batch, clean, tok, row))


def test_every_loader_batch_is_checked_against_its_source(loaders_and_samples):
    """Guard for the helpers above: a corrupted copy of a clean batch is caught."""
    loaders, clean, tok = loaders_and_samples
    batch = loaders["mlm"].next()
    with pytest.raises(AssertionError):
        assert_full_text(batch, clean, tok)
    tampered = dict(batch, img_feat=batch["img_feat"].clone())
    tampered["img_feat"][0, 0] = 0
    if np.any(clean[batch["keys"][0]].img_feat[0] != 0):
        with pytest.raises(AssertionError):
            assert_full_image(tampered, clean)
