"""`load_pretrained` (docs/downstream.md): accepted and refused key sets, the retrieval rank-head
copy, and the NLVR2/VCR table extensions (CPU, tiny)."""
from __future__ import annotations

from typing import Dict

import pytest
import torch
from torch import Tensor

from tests.unit.test_downstream_heads import HEADS, TINY, randomize_
from trainer.models.convert import export_uniter_state_dict, import_uniter_state_dict
from trainer.models.downstream import HeadConfig, UniterForFinetuning
from trainer.models.downstream_load import TYPE_TABLE, WORD_TABLE, load_pretrained
from trainer.models.pretrain import UniterForPretraining

PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


def pretrain_dict(seed: int = 3) -> Dict[str, Tensor]:
    return {k: v.clone() for k, v in randomize_(UniterForPretraining(TINY), seed).state_dict().items()}


def head_keys(model: UniterForFinetuning) -> list[str]:
    return [k for k in model.state_dict() if not k.startswith("uniter.")]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_pretraining_dict_loads_with_only_heads_missing_and_unexpected(name):
    sd = pretrain_dict()
    model = UniterForFinetuning(TINY, HEADS[name])
    report = load_pretrained(model, sd, model.head)
    retrieval = name == "retrieval"
    expected_unexpected = [k for k in sd if k.startswith(PRETRAIN_HEADS) and not (retrieval and k.startswith("itm_"))]
    assert report.unexpected == expected_unexpected
    assert report.missing == [k for k in head_keys(model) if not (retrieval and k.startswith("itm_"))]
    ours = model.state_dict()
    for key, value in sd.items():
        if key in (TYPE_TABLE, WORD_TABLE):
            assert torch.equal(ours[key][:value.shape[0]], value), key
        elif key in ours:
            assert torch.equal(ours[key], value), key


def test_uniter_format_file_through_the_importer_loads():
    sd = import_uniter_state_dict(export_uniter_state_dict(pretrain_dict()))
    model = UniterForFinetuning(TINY, HEADS["vqa"])
    report = load_pretrained(model, sd, model.head)
    assert "cls.predictions.bias" in report.unexpected and "itm_output.weight" in report.unexpected


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fine_tuned_dict_of_the_same_task_loads_as_is(name):
    source = randomize_(UniterForFinetuning(TINY, HEADS[name]), seed=4)
    model = UniterForFinetuning(TINY, HEADS[name])
    report = load_pretrained(model, source.state_dict(), model.head)
    assert (report.missing, report.unexpected, report.copied) == ([], [], [])
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------- retrieval rank head

def test_rank_output_is_a_copy_of_the_positive_itm_row():
    sd = pretrain_dict()
    itm_w, itm_b = sd["itm_output.weight"].clone(), sd["itm_output.bias"].clone()
    model = UniterForFinetuning(TINY, HEADS["retrieval"])
    report = load_pretrained(model, sd, model.head)
    assert torch.equal(model.rank_output.weight, itm_w[1:2]) and torch.equal(model.rank_output.bias, itm_b[1:2])
    assert torch.equal(model.itm_output.weight, itm_w)
    assert "rank_output.weight <- itm_output.weight[1:2]" in report.copied
    # Not aliased: changing the rank head changes neither the ITM head nor the source dict.
    assert model.rank_output.weight.data_ptr() != model.itm_output.weight.data_ptr()
    with torch.no_grad():
        model.rank_output.weight.add_(1.0)
        model.rank_output.bias.add_(1.0)
    assert torch.equal(model.itm_output.weight, itm_w) and torch.equal(model.itm_output.bias, itm_b)
    assert torch.equal(sd["itm_output.weight"], itm_w)


def test_loaded_rank_output_is_never_overwritten():
    finetuned = randomize_(UniterForFinetuning(TINY, HEADS["retrieval"]), seed=6).state_dict()
    assert not torch.equal(finetuned["rank_output.weight"], finetuned["itm_output.weight"][1:2])
    model = UniterForFinetuning(TINY, HEADS["retrieval"])
    report = load_pretrained(model, finetuned, model.head)
    assert torch.equal(model.rank_output.weight, finetuned["rank_output.weight"])
    assert torch.equal(model.rank_output.bias, finetuned["rank_output.bias"])
    assert report.copied == []


# ---------------------------------------------------------------- type and word tables

def test_nlvr2_two_type_rows_get_row_2_from_row_1():
    sd = pretrain_dict()
    for name in ("nlvr2-paired", "nlvr2-triplet", "nlvr2-paired-attn"):
        model = UniterForFinetuning(TINY, HEADS[name])
        report = load_pretrained(model, sd, model.head)
        table = model.uniter.embeddings.token_type_embeddings.weight
        assert table.shape[0] == 3
        assert torch.equal(table[:2], sd[TYPE_TABLE]) and torch.equal(table[2], sd[TYPE_TABLE][1])
        assert report.copied == [f"{TYPE_TABLE}[2] <- [1]"]


def test_three_type_rows_load_as_is():
    sd = pretrain_dict()
    sd[TYPE_TABLE] = torch.randn(3, TINY.hidden_size)
    model = UniterForFinetuning(TINY, HEADS["nlvr2-paired"])
    report = load_pretrained(model, sd, model.head)
    assert torch.equal(model.uniter.embeddings.token_type_embeddings.weight, sd[TYPE_TABLE])
    assert report.copied == []


def test_vcr_type_rows_2_3_from_row_0_and_extra_words_keep_init():
    sd = pretrain_dict()
    model = UniterForFinetuning(TINY, HEADS["vcr"])
    v = TINY.vocab_size
    extra_before = model.uniter.embeddings.word_embeddings.weight[v:].detach().clone()
    report = load_pretrained(model, sd, model.head)
    types = model.uniter.embeddings.token_type_embeddings.weight
    assert torch.equal(types[:2], sd[TYPE_TABLE])
    assert torch.equal(types[2], sd[TYPE_TABLE][0]) and torch.equal(types[3], sd[TYPE_TABLE][0])
    words = model.uniter.embeddings.word_embeddings.weight
    assert words.shape[0] == v + 81
    assert torch.equal(words[:v], sd[WORD_TABLE])
    assert torch.equal(words[v:], extra_before)  # N(0, 0.02) init rows, untouched
    assert abs(words[v:].std().item() - 0.02) < 0.005
    assert f"{TYPE_TABLE}[2] <- [0]" in report.copied and f"{TYPE_TABLE}[3] <- [0]" in report.copied


def test_vcr_second_stage_dict_with_extended_tables_loads_as_is():
    sd = pretrain_dict()
    sd[TYPE_TABLE] = torch.randn(4, TINY.hidden_size)
    sd[WORD_TABLE] = torch.randn(TINY.vocab_size + 81, TINY.hidden_size)
    sd["cls.predictions.bias"] = torch.randn(TINY.vocab_size + 81)  # its MLM head was rebuilt too
    model = UniterForFinetuning(TINY, HEADS["vcr"])
    report = load_pretrained(model, sd, model.head)
    assert torch.equal(model.uniter.embeddings.token_type_embeddings.weight, sd[TYPE_TABLE])
    assert torch.equal(model.uniter.embeddings.word_embeddings.weight, sd[WORD_TABLE])
    assert report.copied == []


# ---------------------------------------------------------------- refusals

def test_unknown_key_is_refused():
    sd = pretrain_dict()
    sd["something_else.weight"] = torch.zeros(2)
    model = UniterForFinetuning(TINY, HEADS["vqa"])
    with pytest.raises(ValueError, match="something_else.weight"):
        load_pretrained(model, sd, model.head)


def test_other_tasks_head_is_refused():
    sd = randomize_(UniterForFinetuning(TINY, HEADS["vqa"])).state_dict()
    model = UniterForFinetuning(TINY, HEADS["nlvr2-paired"])
    with pytest.raises(ValueError, match="vqa_output"):
        load_pretrained(model, sd, model.head)


def test_itm_output_is_not_a_leftover_for_retrieval_only():
    # itm_output is the retrieval model's own key; elsewhere it is an allowed leftover.
    sd = pretrain_dict()
    model = UniterForFinetuning(TINY, HEADS["retrieval"])
    assert "itm_output.weight" not in load_pretrained(model, sd, model.head).unexpected


def test_missing_backbone_key_is_refused():
    sd = pretrain_dict()
    del sd["uniter.encoder.layer.1.output.dense.bias"]
    model = UniterForFinetuning(TINY, HEADS["re-cls"])
    with pytest.raises(ValueError, match="uniter.encoder.layer.1.output.dense.bias"):
        load_pretrained(model, sd, model.head)


def test_extra_backbone_layer_is_refused():
    sd = pretrain_dict()
    sd["uniter.encoder.layer.2.output.dense.bias"] = torch.zeros(TINY.hidden_size)
    model = UniterForFinetuning(TINY, HEADS["vqa"])
    with pytest.raises(ValueError, match="layer.2"):
        load_pretrained(model, sd, model.head)


def test_shape_mismatch_is_refused_with_the_key():
    sd = pretrain_dict()
    sd["uniter.img_embeddings.img_linear.weight"] = torch.zeros(TINY.hidden_size, 5)
    model = UniterForFinetuning(TINY, HEADS["vqa"])
    with pytest.raises(ValueError, match="img_linear.weight"):
        load_pretrained(model, sd, model.head)
    wide = randomize_(UniterForFinetuning(TINY, HEADS["vqa"])).state_dict()
    model = UniterForFinetuning(TINY, HeadConfig("vqa", num_answers=7))
    with pytest.raises(ValueError, match="vqa_output.3.weight"):
        load_pretrained(model, wide, model.head)
    sd = pretrain_dict()
    sd[TYPE_TABLE] = torch.randn(4, TINY.hidden_size)  # a VCR table into NLVR2
    model = UniterForFinetuning(TINY, HEADS["nlvr2-paired"])
    with pytest.raises(ValueError, match="token_type_embeddings"):
        load_pretrained(model, sd, model.head)


def test_head_config_must_be_the_models():
    model = UniterForFinetuning(TINY, HEADS["vqa"])
    with pytest.raises(ValueError, match="head"):
        load_pretrained(model, pretrain_dict(), HeadConfig("ve"))
