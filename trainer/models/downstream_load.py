"""Load a pretraining (or fine-tuned) state dict into `UniterForFinetuning` (docs/downstream.md).

Accepted dicts, all in our key names: a vlpt pretraining dict (`uniter.*`, `cls.*`,
`feat_regress.*`, `region_classifier.*`, `itm_output.*`), a UNITER file passed through
`import_uniter_state_dict`, or a fine-tuned dict of the same task. Rules:

- every `uniter.*` key must be present with the model's shape; the only exceptions are the
  type table and VCR's word table, which may have the pretraining sizes (2 type rows, V words)
  and are then extended here: NLVR2 type row 2 <- row 1, VCR type rows 2, 3 <- row 0, VCR's
  extra word rows keep their N(0, 0.02) init;
- the pretraining heads (`cls.*`, `feat_regress.*`, `region_classifier.*`, and `itm_output.*`
  except for retrieval, which keeps it) are the only keys the model may lack;
- the task head's keys are the only keys the dict may lack;
- retrieval: without `rank_output.*` in the dict, rank_output is set to a copy of the positive
  ITM row (`itm_output.{weight,bias}[1:2]`); a loaded rank_output is never overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import torch
from torch import Tensor

from trainer.models.downstream import HeadConfig, UniterForFinetuning
from trainer.models.weights import listed

TYPE_TABLE = "uniter.embeddings.token_type_embeddings.weight"
WORD_TABLE = "uniter.embeddings.word_embeddings.weight"
PRETRAIN_TYPE_ROWS = 2
PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
# New type rows are copies of a pretrained row (UNITER's init_type_embedding): row -> source.
TYPE_ROW_COPIES = {"nlvr2": {2: 1}, "vcr": {2: 0, 3: 0}}


@dataclass
class LoadReport:
    """What `load_pretrained` did, by state-dict key."""

    missing: List[str] = field(default_factory=list)
    """Model keys the dict lacked (task head keys): left at their init, or copied (see `copied`)."""
    unexpected: List[str] = field(default_factory=list)
    """Dict keys the model has no use for (pretraining heads): ignored."""
    copied: List[str] = field(default_factory=list)
    """Values built from other values, as `target <- source`."""


def load_pretrained(model: UniterForFinetuning, sd: Mapping[str, Tensor], head: HeadConfig) -> LoadReport:
    """Load `sd` into `model` by the rules above; ValueError naming the keys when it does not fit."""
    if head != model.head:
        raise ValueError(f"head {head} differs from the model's {model.head}; build the model with this head")
    ours = model.state_dict()
    report = LoadReport()
    to_load = {k: v for k, v in sd.items() if k in ours}
    report.unexpected = [k for k in sd if k not in ours]
    _check_unexpected(report.unexpected, head)
    report.missing = [k for k in ours if k not in sd]
    _check_missing(report.missing, model)
    to_load.update(_extended_tables(to_load, ours, head, report))
    _check_shapes(to_load, ours)
    model.load_state_dict(to_load, strict=False)
    if head.task == "retrieval":
        _init_rank_output(model, sd, report)
    return report


def _check_unexpected(unexpected: List[str], head: HeadConfig) -> None:
    allowed = PRETRAIN_HEADS if head.task != "retrieval" else tuple(p for p in PRETRAIN_HEADS if p != "itm_output.")
    bad = [k for k in unexpected if not k.startswith(allowed)]
    if bad:
        raise ValueError(
            f"state dict has keys the {head.task} model does not know: {listed(bad)}. Only pretraining "
            f"heads ({', '.join(p + '*' for p in allowed)}) may be left over; check that the file is a vlpt/UNITER "
            "pretraining checkpoint (UNITER files through import_uniter_state_dict) or a fine-tuned "
            f"{head.task} checkpoint with the same model sizes"
        )


def _check_missing(missing: List[str], model: UniterForFinetuning) -> None:
    head_prefixes = tuple(p + "." for p in model.head_prefixes())
    bad = [k for k in missing if not k.startswith(head_prefixes)]
    if bad:
        raise ValueError(
            f"state dict lacks backbone keys {listed(bad)}; every uniter.* key must be present. Check "
            "num_hidden_layers and that the file is a full UNITER pretraining or fine-tuned state dict"
        )


def _extended_tables(to_load: Dict[str, Tensor], ours: Mapping[str, Tensor], head: HeadConfig,
                     report: LoadReport) -> Dict[str, Tensor]:
    """Pretraining-sized type/word tables -> the task's sizes (new rows as the rules say)."""
    out = {}
    types = to_load.get(TYPE_TABLE)
    if types is not None and head.task in TYPE_ROW_COPIES and types.size(0) == PRETRAIN_TYPE_ROWS:
        table = ours[TYPE_TABLE].clone()  # [T, H]
        table[:PRETRAIN_TYPE_ROWS] = types
        for row, source in TYPE_ROW_COPIES[head.task].items():
            table[row] = types[source]
            report.copied.append(f"{TYPE_TABLE}[{row}] <- [{source}]")
        out[TYPE_TABLE] = table
    words = to_load.get(WORD_TABLE)
    base_vocab = ours[WORD_TABLE].size(0) - head.vcr_extra_words
    if words is not None and head.task == "vcr" and head.vcr_extra_words and words.size(0) == base_vocab:
        # Start from the model's own table so the extra rows keep their N(0, 0.02) init.
        table = ours[WORD_TABLE].clone()  # [V + extra, H]
        table[:base_vocab] = words
        out[WORD_TABLE] = table
    return out


def _check_shapes(to_load: Mapping[str, Tensor], ours: Mapping[str, Tensor]) -> None:
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in to_load.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(
            f"shape mismatch (state dict vs model) in {listed(bad)}; set the model config sizes "
            "(hidden_size, vocab_size, img_dim, num_answers, ...) to those of the checkpoint"
        )


@torch.no_grad()
def _init_rank_output(model: UniterForFinetuning, sd: Mapping[str, Tensor], report: LoadReport) -> None:
    """rank_output <- copy of the positive ITM row, unless the dict brought its own rank_output."""
    if any(k.startswith("rank_output.") for k in sd) or "itm_output.weight" not in sd:
        return
    # copy_ into the existing parameters: the two heads never share storage, so training
    # rank_output leaves itm_output (and the source dict) untouched.
    model.rank_output.weight.copy_(model.itm_output.weight[1:2])  # [1, H]
    model.rank_output.bias.copy_(model.itm_output.bias[1:2])  # [1]
    report.copied += ["rank_output.weight <- itm_output.weight[1:2]", "rank_output.bias <- itm_output.bias[1:2]"]
