"""ALBEF retrieval fine-tuning's pieces (docs/downstream.md, "ALBEF retrieval") against values computed
here: positives shared by every pair of an image in the batch and in the queue, the unclamped learnt
temperature, the +1e-4 negative weights with every same-image pair excluded, ALBEF's downstream text,
the image-index queue, and the loading rules of finetune.init_from."""
from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch

from data.collate_albef import caption_batch, image_index, pre_caption
from data.tokenizer import load_tokenizer
from tests.conftest import REPO
from trainer.models.albef import Albef, AlbefTeacher
from trainer.models.albef_finetune_load import FRESH, load_into
from trainer.models.config import AlbefConfig
from trainer.models.momentum import EMPTY_INDEX, FeatureQueues
from trainer.objectives import albef
from trainer.recipes.albef_tasks import RETRIEVAL_WEIGHT_SHIFT, RetrievalTargets, albef_retrieval_losses

RNG = np.random.default_rng(1)
TINY = AlbefConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1,
                   fusion_layers=1, max_position_embeddings=16, vision_width=32, vision_layers=1, vision_heads=2,
                   vision_mlp=64, image_size=32, patch_size=16, embed_dim=8, queue_size=6,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def unit_rows(n: int, d: int) -> np.ndarray:
    x = RNG.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def idx_itc_by_hand(img, txt, img_m, txt_m, queue_i, queue_t, idx, idx_queue, temp, alpha):
    """Plain Python: per row, targets alpha * softmax(momentum sims) + (1 - alpha) * (1 / #same-image
    columns on each column of the row's image), over [batch | queue]; then the mean soft CE, both ways."""
    columns = list(idx) + list(idx_queue)
    text_all = np.concatenate([txt_m, queue_t.T])
    image_all = np.concatenate([img_m, queue_i.T])
    total = 0.0
    for anchors, anchors_m, cands in ((img, img_m, text_all), (txt, txt_m, image_all)):
        loss = 0.0
        for i in range(len(anchors)):
            same = [1.0 if c == idx[i] else 0.0 for c in columns]
            sims = [float(anchors[i] @ c) / temp for c in cands]
            sims_m = [float(anchors_m[i] @ c) / temp for c in cands]
            e_m = [math.exp(s - max(sims_m)) for s in sims_m]
            target = [alpha * e / sum(e_m) + (1 - alpha) * s / sum(same) for e, s in zip(e_m, same)]
            log_z = max(sims) + math.log(sum(math.exp(s - max(sims)) for s in sims))
            loss += -sum(t * (s - log_z) for t, s in zip(target, sims))
        total += loss / len(anchors)
    return total / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_positives_are_every_pair_of_the_image_in_batch_and_queue(alpha):
    b, d, q = 4, 8, 5
    idx = [7, 7, 3, 9]
    idx_queue = [3, EMPTY_INDEX, 7, 11, EMPTY_INDEX]  # a queued caption of image 7 and one of 3
    img, txt, img_m, txt_m = (unit_rows(b, d) for _ in range(4))
    queue_i, queue_t = unit_rows(q, d).T, unit_rows(q, d).T
    want = idx_itc_by_hand(img, txt, img_m, txt_m, queue_i, queue_t, idx, idx_queue, 0.07, alpha)
    t = [torch.tensor(a, dtype=torch.float64) for a in (img, txt, img_m, txt_m, queue_i, queue_t)]
    positives = albef.shared_index_targets(torch.tensor(idx), torch.tensor(idx + idx_queue), torch.float64)
    assert positives[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 0, 0, 0, 1 / 3, 0, 0])
    assert positives[2].tolist() == pytest.approx([0, 0, 0.5, 0, 0.5, 0, 0, 0, 0])
    got = albef.itc_loss(*t, temp=torch.tensor(0.07, dtype=torch.float64), alpha=alpha, positives=positives)
    assert got.loss.item() == pytest.approx(want, rel=1e-10)


def test_empty_queue_slots_never_match_an_image():
    ids = image_index([f"img{i}" for i in range(1000)])
    assert (ids >= 0).all() and len(set(ids.tolist())) == 1000
    assert image_index(["a", "b", "a"]).tolist()[0] == image_index(["a"]).item()  # the same in every batch
    queues = FeatureQueues(4, 6, image_index=True)
    assert queues.idx_queue.tolist() == [EMPTY_INDEX] * 6
    queues.push(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([5, 6, 7, 8]))
    queues.push(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([1, 2, 3, 4]))
    assert queues.idx_queue.tolist() == [3, 4, 7, 8, 1, 2] and int(queues.ptr) == 2
    assert "idx_queue" not in FeatureQueues(4, 6).state_dict()  # pretraining's teacher files are unchanged


def test_pre_caption_and_text_without_sep():
    assert pre_caption("A man's  bike-rack, (red)!  and/or <person>.") == "a mans bike rack red and or person"
    assert pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    tok = load_tokenizer(str(REPO / "data/vocab/demo-vocab.txt"))
    ids, attn = caption_batch(["a red cube", "a ball"], tok, 30, sep=False)
    assert ids[:, 0].tolist() == [tok.cls_id] * 2 and tok.sep_id not in ids.tolist()[0] + ids.tolist()[1]
    assert attn.sum(1).tolist() == [1 + len(tok.encode("a red cube")), 1 + len(tok.encode("a ball"))]
    assert ids.shape[1] == attn.sum(1).max() and (ids[attn == 0] == tok.pad_id).all()


def tiny_batch(image_ids: list[str]) -> dict:
    from data.collate_albef import batch_image_index

    torch.manual_seed(0)
    b = len(image_ids)
    return {"pixels": torch.randn(b, 3, 32, 32), "input_ids": torch.randint(5, 50, (b, 6)),
            "attn_mask": torch.ones(b, 6, dtype=torch.long), "image_ids": batch_image_index(image_ids),
            "image_index": image_index(image_ids), "n_images": len(set(image_ids)), "n_items": b}


def targets_for(batch: dict, alpha: float = 0.4) -> RetrievalTargets:
    b, q = batch["n_items"], TINY.queue_size
    feats = [torch.nn.functional.normalize(torch.randn(n, TINY.embed_dim), dim=-1) for n in (b, b, q, q)]
    index_all = torch.cat([batch["image_index"], torch.full((q,), EMPTY_INDEX)])
    return RetrievalTargets(feats[0], feats[1], feats[2].t(), feats[3].t(), index_all, 0, alpha, 5)


def test_temperature_is_learnt_unclamped():
    model = Albef(TINY, mlm_head=False)
    with torch.no_grad():
        model.temp.fill_(0.9)  # above pretraining's clamp (0.5)
    batch = tiny_batch(["a", "a", "b", "c"])
    result = albef_retrieval_losses(model, batch, targets_for(batch))
    assert model.temp.item() == pytest.approx(0.9)
    (result.losses["itc"] + result.losses["itm"]).backward()
    assert model.temp.grad is not None and model.temp.grad.abs().item() > 0


def test_negatives_are_drawn_with_shifted_weights_and_never_from_the_same_image():
    model = Albef(TINY, mlm_head=False)
    batch = tiny_batch(["a", "a", "b", "b", "c", "a"])
    seen = {}
    real_sample, real_itc = albef.sample_hard_negatives, albef.itc_loss

    def sample_spy(sim_i2t, sim_t2i, image_ids, generator=None, hard=True):
        seen.update(sim_i2t=sim_i2t, sim_t2i=sim_t2i, image_ids=image_ids, hard=hard)
        return real_sample(sim_i2t, sim_t2i, image_ids, generator, hard)

    def itc_spy(*args, **kwargs):
        seen["itc"] = real_itc(*args, **kwargs)
        return seen["itc"]

    with mock.patch.object(albef, "sample_hard_negatives", sample_spy), mock.patch.object(albef, "itc_loss", itc_spy):
        albef_retrieval_losses(model, batch, targets_for(batch))
    assert RETRIEVAL_WEIGHT_SHIFT == 1e-4 and seen["hard"] is True  # model.itm_negatives: hard, ALBEF's
    torch.testing.assert_close(seen["sim_i2t"], seen["itc"].sim_i2t[:, :6] + 1e-4)
    torch.testing.assert_close(seen["sim_t2i"], seen["itc"].sim_t2i[:, :6] + 1e-4)
    weights = albef.hard_negative_weights(seen["sim_i2t"], seen["image_ids"])
    same = batch["image_index"][:, None] == batch["image_index"][None, :]
    torch.testing.assert_close(weights, torch.softmax(seen["sim_i2t"].detach(), 1).masked_fill(same, 0.0))
    assert (weights[same] == 0).all() and (weights.sum(1) < 1).all()  # not renormalised after the exclusion
    for seed in range(50):
        neg_text, neg_image = albef.sample_hard_negatives(seen["sim_i2t"], seen["sim_i2t"], seen["image_ids"],
                                                          torch.Generator().manual_seed(seed))
        idx = batch["image_index"]
        assert (idx[neg_text] != idx).all() and (idx[neg_image] != idx).all()


def test_random_itm_negatives_reach_the_sampler_from_the_model_config():
    import dataclasses

    model = Albef(dataclasses.replace(TINY, itm_negatives="random"), mlm_head=False)
    batch = tiny_batch(["a", "a", "b", "b", "c", "a"])
    flags = []
    real_sample = albef.sample_hard_negatives

    def sample_spy(*args, hard=True):
        flags.append(hard)
        return real_sample(*args, hard=hard)

    with mock.patch.object(albef, "sample_hard_negatives", sample_spy):
        albef_retrieval_losses(model, batch, targets_for(batch))
    assert flags == [False]


def test_a_micro_batch_of_one_image_is_refused_with_the_keys_to_change():
    batch = tiny_batch(["a", "a", "a"])
    with pytest.raises(ValueError, match="one image only.*data.micro_batch_size"):
        albef_retrieval_losses(Albef(TINY, mlm_head=False), batch, targets_for(batch))


def test_init_drops_the_mlm_head_keeps_queues_and_starts_the_index_queue_fresh():
    torch.manual_seed(0)
    pretrained = Albef(TINY)
    pre_teacher = AlbefTeacher(pretrained)
    with torch.no_grad():
        pre_teacher.queues.image_queue.add_(1.0)
        pre_teacher.queues.ptr.fill_(3)
    model = Albef(TINY, mlm_head=False)
    assert load_into(model, pretrained.state_dict(), "src") == [k for k in pretrained.state_dict()
                                                                if k.startswith("text_encoder.cls.")]
    for k, v in model.state_dict().items():
        assert torch.equal(v, pretrained.state_dict()[k]), k
    teacher = AlbefTeacher(model, image_index_queue=True)
    load_into(teacher, pre_teacher.state_dict(), "src teacher", fresh=FRESH)
    assert torch.equal(teacher.queues.image_queue, pre_teacher.queues.image_queue) and int(teacher.queues.ptr) == 3
    assert teacher.queues.idx_queue.tolist() == [EMPTY_INDEX] * TINY.queue_size
    with pytest.raises(ValueError, match="missing .*vision_proj.weight"):
        load_into(model, {k: v for k, v in pretrained.state_dict().items() if k != "vision_proj.weight"}, "src")


def test_a_queue_of_another_size_is_refused():
    teacher = AlbefTeacher(Albef(TINY, mlm_head=False), image_index_queue=True)
    other = AlbefTeacher(Albef(AlbefConfig(**{**TINY.__dict__, "queue_size": 12}), mlm_head=False))
    with pytest.raises(ValueError, match="shape mismatch.*model.queue_size"):
        load_into(teacher, other.state_dict(), "src teacher", fresh=FRESH)


def test_position_grid_is_resized_to_the_model_image_size():
    small = Albef(TINY, mlm_head=False)
    big = Albef(AlbefConfig(**{**TINY.__dict__, "image_size": 48}), mlm_head=False)
    load_into(big, small.state_dict(), "src")
    pos = big.state_dict()["visual_encoder.embeddings.position_embeddings"]
    assert pos.shape[1] == 1 + 9 and torch.equal(pos[:, :1], small.state_dict()[
        "visual_encoder.embeddings.position_embeddings"][:, :1])



@pytest.mark.parametrize("task", ["retrieval", "ve", "nlvr2", "ta", "vqa", "grounding"])
def test_the_demo_configs_fit_the_demo_pretraining_checkpoint(task):
    """configs/finetune/demo-albef-<task>.yaml loads the `make demo-albef` run: the same model section, less the
    ViT directory the pretraining started from; the tasks that draw negatives (ITM, text assignment's partners) draw
    them as the pretraining did."""
    import dataclasses

    from trainer.config import load_config

    finetune = load_config(str(REPO / f"configs/finetune/demo-albef-{task}.yaml"))
    pretrain = load_config(str(REPO / "configs/pretrain/demo-albef.yaml"))
    assert (finetune.stage, finetune.tasks) == ("finetune", {task: 1.0})
    assert pretrain.model.init_from_vit == str(REPO / "runs/demo-vit") and finetune.model.init_from_vit is None
    draws_negatives = task in ("retrieval", "grounding", "ta")
    assert (finetune.model.itm_negatives == pretrain.model.itm_negatives) == draws_negatives
    assert finetune.model == dataclasses.replace(pretrain.model, init_from_vit=None,
                                                 itm_negatives=finetune.model.itm_negatives)
    assert finetune.finetune.init_from == str(REPO / "runs/demo-albef")


@pytest.mark.parametrize("name, k_test, steps", [("coco", 256, 11065), ("flickr", 128, 5660)])
def test_the_base_configs_are_albefs_retrieval_settings(name, k_test, steps):
    import dataclasses

    from trainer.config import load_config
    from trainer.engine import batch_layout

    cfg = load_config(str(REPO / f"configs/finetune/albef-base-retrieval-{name}.yaml"))
    pretrain_model = AlbefConfig()  # ALBEF-base (configs/model/albef-base.yaml has its values)
    assert dataclasses.replace(cfg.model, image_size=pretrain_model.image_size, k_test=pretrain_model.k_test) == \
        dataclasses.replace(pretrain_model, vocab_size=cfg.model.vocab_size)
    assert (cfg.model.image_size, cfg.data.albef.pixels.image_size, cfg.model.k_test) == (384, 384, k_test)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-5, 1e-6, 0.02, 0.0)
    assert cfg.train.max_steps == steps and cfg.tasks == {"retrieval": 1.0}
    assert (cfg.optim.schedule, cfg.optim.warmup_lr, cfg.optim.warmup_steps) == ("albef_epochs", 1e-5, 100)
    type(cfg).__post_init__(cfg)  # the recipe's checks
    layout = batch_layout(cfg.optim, cfg.data.micro_batch_size, 8)
    assert layout.global_batch_size == 256 and cfg.model.queue_size % 256 == 0


def test_albefs_finetune_recipe_is_the_tasks():
    from trainer.config import load_config
    from trainer.recipes import recipe_class, recipe_for
    from trainer.recipes.albef_retrieval import AlbefRetrievalRecipe
    from trainer.recipes.albef_ve import AlbefVeRecipe

    for task, want in (("retrieval", AlbefRetrievalRecipe), ("ve", AlbefVeRecipe)):
        cfg = load_config(str(REPO / f"configs/finetune/demo-albef-{task}.yaml"))
        assert recipe_for(cfg) is want and type(recipe_class("albef", "finetune")(cfg)) is want
    with pytest.raises(ValueError, match="trains one task"):
        load_config(str(REPO / "configs/finetune/demo-albef-ve.yaml"), ["--tasks.retrieval=1"])
