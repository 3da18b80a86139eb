"""ALBEF VQA's pieces (docs/downstream.md, "ALBEF VQA") against values computed here: the answer loss and its
distillation, the ranking (first token counted twice, as ALBEF), the decoder's causal and question masks, its
start from the fusion layers and MLM head, the batch, and the export names."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.collate_albef import answer_batch, collate_albef_vqa
from data.pixels import PixelConfig
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.unit.test_albef_ve import TINY
from trainer.models.albef import Albef
from trainer.models.albef_finetune_load import decoder_from_fusion, load_into
from trainer.models.albef_vqa import AlbefVqa
from trainer.models.convert_albef import export_albef_state_dict, import_albef_state_dict
from trainer.objectives.albef import (answer_token_losses, distilled_answer_losses, first_token_candidates,
                                      reranked_answer_scores)
from trainer.recipes.albef_vqa import NOT_IN_VQA, AlbefVqaRecipe

IDS = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])  # [CLS] a b [SEP] / [CLS] c [SEP] pad
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def log_softmax_rows(logits: torch.Tensor) -> list[list[list[float]]]:
    out = []
    for answer in logits.tolist():
        rows = []
        for z in answer:
            norm = math.log(sum(math.exp(v) for v in z))
            rows.append([v - norm for v in z])
        out.append(rows)
    return out


def test_answer_loss_sums_the_next_tokens_after_cls_sep_included_pads_ignored():
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = log_softmax_rows(logits)
    want = [-(lp[0][0][5] + lp[0][1][6] + lp[0][2][2]), -(lp[1][0][7] + lp[1][1][2])]
    assert answer_token_losses(logits, IDS, MASK).tolist() == pytest.approx(want, rel=1e-6)


def test_distilled_answer_loss_mixes_ce_and_the_teachers_soft_targets_over_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    logits, logits_m = (torch.randn(2, 4, 9, generator=g, dtype=torch.float64) for _ in range(2))
    lp = log_softmax_rows(logits)
    soft = torch.softmax(logits_m, -1).tolist()
    want = []
    for n, steps in ((0, 3), (1, 2)):  # predicted positions per answer: its tokens after [CLS]
        ce = -sum(lp[n][t][int(IDS[n, t + 1])] for t in range(steps))
        distill = -sum(sum(p * q for p, q in zip(soft[n][t], lp[n][t])) for t in range(steps))
        want.append(0.6 * ce + 0.4 * distill)
    got = distilled_answer_losses(logits, logits_m, IDS, MASK, 0.4)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    plain = answer_token_losses(logits, IDS, MASK)
    assert torch.equal(distilled_answer_losses(logits, logits_m, IDS, MASK, 0.0), plain)


def test_ranking_counts_the_first_token_twice_as_albef():
    first = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.0]], dtype=torch.float64)  # [1, V]
    probs, ids = first_token_candidates(first, IDS, k=5)  # k capped at the 2 candidates
    p = torch.softmax(first, -1)[0]
    assert ids.tolist() == [[0, 1]] and probs[0].tolist() == pytest.approx([p[5].item(), p[7].item()])
    # an answer decoder whose first step agrees with `first`: its CE already holds -log p(first token)
    logits = torch.zeros(2, 4, 9, dtype=torch.float64)
    logits[:, 0] = first[0]
    loss = answer_token_losses(logits, IDS, MASK)  # [2]
    scores = reranked_answer_scores(probs, loss[None])
    rest = [math.log(1 / 9) * 2, math.log(1 / 9)]  # the uniform later steps of each answer
    want = [2 * math.log(p[5].item()) + rest[0], 2 * math.log(p[7].item()) + rest[1]]
    assert scores[0].tolist() == pytest.approx(want, rel=1e-6)  # the losses are taken in fp32


def tiny_vqa(seed: int = 0) -> AlbefVqa:
    torch.manual_seed(seed)
    return AlbefVqa(TINY).eval()


def question_batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"pixels": torch.randn(b, 3, 32, 32, generator=g), "input_ids": torch.randint(4, 50, (b, 5), generator=g),
            "attn_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]][:b])}


def test_decoder_is_causal_and_ignores_question_padding():
    model = tiny_vqa()
    batch = question_batch()
    with torch.no_grad():
        states = model.question_states(batch)
        ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
        base = model.decode(states, batch["attn_mask"], ids, torch.ones_like(ids))
        changed = torch.tensor([[1, 5, 9, 9], [1, 7, 9, 9]])
        later = model.decode(states, batch["attn_mask"], changed, torch.ones_like(ids))
        padded = states.clone()
        padded[1, 3:] = 100.0  # the second question's padding
        repadded = model.decode(padded, batch["attn_mask"], ids, torch.ones_like(ids))
    torch.testing.assert_close(later[:, :2], base[:, :2], rtol=0, atol=1e-6)  # positions 0, 1 never see 2, 3
    assert not torch.allclose(later[:, 2:], base[:, 2:])
    torch.testing.assert_close(repadded, base, rtol=0, atol=1e-5)


def test_ranked_scores_are_albefs_over_all_candidates_and_minus_inf_outside_the_top_k():
    model = tiny_vqa()
    batch = question_batch()
    answers, mask = IDS, MASK
    with torch.no_grad():
        got = model.ranked_scores(batch, answers, mask, k=2)
        one = model.ranked_scores(batch, answers, mask, k=1)
        states = model.question_states(batch)
        want, likeliest_first = torch.zeros(2, 2), []
        for q in range(2):
            one_cls = torch.ones(1, 1, dtype=torch.long)
            start = model.decode(states[q:q + 1], batch["attn_mask"][q:q + 1], answers[:1, :1], one_cls)
            p_first = torch.softmax(start[0, 0], -1)
            likeliest_first.append(int(p_first[answers[:, 1]].argmax()))
            for a in range(2):
                logits = model.decode(states[q:q + 1], batch["attn_mask"][q:q + 1], answers[a:a + 1], mask[a:a + 1])
                loss = answer_token_losses(logits, answers[a:a + 1], mask[a:a + 1])[0]
                want[q, a] = p_first[answers[a, 1]].log() - loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for q, a in enumerate(likeliest_first):  # k = 1: only the candidate with the likeliest first token is scored
        assert torch.isinf(one[q]).tolist() == [i != a for i in range(2)]
        assert one[q, a].item() == pytest.approx(want[q, a].item(), abs=1e-5)


def test_decoder_starts_from_the_fusion_layers_and_mlm_head():
    torch.manual_seed(4)
    source = Albef(TINY).state_dict()
    model = AlbefVqa(TINY)
    adapted = decoder_from_fusion(source, "test")
    assert not any(k.startswith("text_encoder.cls.") for k in adapted)
    load_into(model, adapted, "test", dropped=NOT_IN_VQA)
    got = model.state_dict()
    for part in ("fusion.0.crossattention.self.key.weight", "fusion.0.output.dense.bias",
                 "embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight", "cls.predictions.bias"):
        assert torch.equal(got[f"text_decoder.{part}"], source[f"text_encoder.{part}"])
    assert torch.equal(got["text_encoder.fusion.0.attention.self.query.weight"],
                       source["text_encoder.fusion.0.attention.self.query.weight"])
    assert decoder_from_fusion(got, "test") is got  # a VQA checkpoint is kept as is
    no_head = {k: v for k, v in source.items() if not k.startswith("text_encoder.cls.")}
    with pytest.raises(ValueError, match="has no MLM head; start from an ALBEF pretraining run"):
        decoder_from_fusion(no_head, "init")


def test_the_decoder_needs_question_states_as_wide_as_the_image_features_it_starts_from():
    with pytest.raises(ValueError, match="model.vision_width=64 .* model.hidden_size=32"):
        AlbefVqa(TINY.__class__(**{**TINY.__dict__, "vision_width": 64}))


def test_batch_flattens_every_labelled_answer_with_its_question_and_weight():
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    vocab = ["red", "left", "two"]
    examples = [({"id": "a", "image_id": "i", "text": "what is left of the cube?", "labels": [1, 0],
                  "scores": [1.0, 0.3], "weights": [0.7, 0.1]}, [picture]),
                ({"id": "b", "image_id": "i", "text": "how many balls?", "labels": [2], "scores": [0.9]}, [picture])]
    batch = collate_albef_vqa(examples, np.random.default_rng(0), tok, PixelConfig(image_size=32, hflip_prob=1.0),
                              30, vocab)
    assert batch["answer_owner"].tolist() == [0, 0, 1]
    assert batch["answer_weights"].tolist() == pytest.approx([0.7, 0.1, 0.9])  # no weights: the soft score
    ids, _ = answer_batch(["right", "red", "two"], tok, 30)  # mirrored: "left" became "right"
    assert torch.equal(batch["answer_ids"], ids) and ids[0, 0] == tok.cls_id and tok.sep_id in ids[0].tolist()
    question = batch["input_ids"][0, 1:int(batch["attn_mask"][0].sum())].tolist()
    assert question == tok.encode("what is right of the cube")
    evaluation = collate_albef_vqa(examples, np.random.default_rng(0), tok, PixelConfig(image_size=32), 30, vocab,
                                   train=False)
    assert "answer_ids" not in evaluation and evaluation["ids"] == ["a", "b"]


def test_recipe_loss_is_the_weighted_sum_of_answer_losses():
    model = tiny_vqa()
    batch = {**question_batch(), "answer_ids": IDS, "answer_mask": MASK, "answer_owner": torch.tensor([0, 1]),
             "answer_weights": torch.tensor([0.7, 0.2])}
    logits_m = torch.randn(2, 4, TINY.vocab_size, generator=torch.Generator().manual_seed(5))
    result = AlbefVqaRecipe.losses(model, batch, logits_m, 0.4)
    per_answer = distilled_answer_losses(model.logits(batch), logits_m, IDS, MASK, 0.4)
    torch.testing.assert_close(result.losses["loss"], 0.7 * per_answer[0] + 0.2 * per_answer[1])


def test_export_names_are_albefs_vqa_model_and_import_back():
    student = {k: v.clone() for k, v in tiny_vqa().state_dict().items()}
    out = export_albef_state_dict(student, {"model." + k: v for k, v in student.items()})
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight" in out
    assert "text_decoder.cls.predictions.decoder.weight" in out and "text_decoder_m.cls.predictions.bias" in out
    assert "text_encoder.encoder.layer.1.crossattention.self.query.weight" in out  # BertModel: no bert.
    assert not any(k.startswith(("text_proj", "itm_head", "temp", "vision_proj")) for k in out)
    back, teacher = import_albef_state_dict(out, list(tiny_vqa().visual_encoder.state_dict()))
    assert back.keys() == student.keys() and all(torch.equal(back[k], student[k]) for k in student)
    assert teacher.keys() == student.keys()
