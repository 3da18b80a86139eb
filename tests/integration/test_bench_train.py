"""`vlpt bench train`: the plain-way baseline trains the very model ours does (same weights,
same losses and gradients), MFU counts real tokens only (exact FLOPs of hand-built batches),
the command prints and records ours/baseline ratios on CPU, for UNITER and ALBEF, one point or
a sweep of micro-batch sizes, and a side that runs out of device memory is recorded as such."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import run_vlpt, write_tiny_config
from tests.engine_util import demo_region_samples, tiny_uniter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(demo_data, tok):
    from data.collate import collate_itm, collate_mlm, collate_mrm

    samples = demo_region_samples(demo_data, tok, 8)
    rng = np.random.default_rng(3)
    return {"mlm": collate_mlm(samples, rng, tok), "itm": collate_itm(samples, rng, tok, neg_prob=0.5),
            "mrfr": collate_mrm(samples, rng, tok, mrm_prob=0.3, task="mrfr")}


@pytest.mark.parametrize("task", ["mlm", "itm", "mrfr"])
def test_baseline_is_the_same_model(batches, tok, task):
    from trainer.bench_families import uniter_plain_model as baseline_model
    from trainer.bench_families import uniter_plain_ops as plain_ops
    from trainer.objectives.itm import WraConfig
    from trainer.recipes.uniter_tasks import task_functions

    fn = task_functions(WraConfig())[task]
    ours = tiny_uniter(tok)
    plain = baseline_model(copy.deepcopy(ours))
    assert type(plain.uniter.encoder).__name__ == "HuggingFaceEncoder"
    got = ours(batches[task], fn).losses["loss"]
    got.backward()
    with plain_ops():
        want = plain(batches[task], fn).losses["loss"]
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain_params = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_boolean_mask_gather_matches_positions():
    from trainer.bench_families import boolean_mask_gather

    hidden = torch.randn(3, 5, 4)
    index = torch.tensor([1, 4, 7, 14])
    torch.testing.assert_close(boolean_mask_gather(hidden, index), hidden.reshape(15, 4)[index])


@pytest.mark.slow
def test_bench_train_cli_prints_and_records_ratios(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "b.yaml", demo_data, tmp_path / "run", tasks={"mlm": 1, "itm": 1, "mrfr": 1})
    out = tmp_path / "train.json"
    proc = run_vlpt(["bench", "train", "--config", str(cfg), "--steps", "4", "--warmup", "1",
                     "--batches-per-task", "2", "--profile-steps", "2", "--out", str(out)])
    assert "ours/baseline: steps/s" in proc.stdout
    assert "ours: top ops by host time over 2 profiled steps" in proc.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "train" and record["timed_steps"] == 4 and record["world_size"] == 1
    for side in ("ours", "baseline"):
        r = record[side]
        assert r["steps"] == 4 and r["seconds"] > 0 and "mfu" not in r  # no MFU without a GPU
        assert r["peak_memory_bytes"] is None  # device memory only on CUDA
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 8, rel=1e-9)
        assert r["tokens_per_s"] > r["samples_per_s"]
        # profiled after timing, so the timed figures are the same with or without it
        assert r["profile"]["steps"] == 2 and "by_self_cuda" not in r["profile"]
        assert any("Self CPU" in line for line in r["profile"]["by_self_cpu"][:4])
        assert any("aten::mm" in line or "aten::addmm" in line for line in r["profile"]["by_self_cpu"])
    q = record["ours_over_baseline"]
    assert q["samples_per_s"] == pytest.approx(record["ours"]["samples_per_s"] / record["baseline"]["samples_per_s"])
    work = record["work"]
    assert work["samples"] == 4 * 8 and work["flops"] < work["padded_flops"]
    assert record["ours"]["tokens_per_s"] == pytest.approx(work["tokens"] / record["ours"]["seconds"])


# ---------------------------------------------------------------- FLOPs of real tokens

# A tiny stack: 2 layers of width 4, FFN 8: P = 2 * (4 * 4^2 + 2 * 4 * 8) = 256 linear weights.
TINY_STACK = SimpleNamespace(num_hidden_layers=2, hidden_size=4, intermediate_size=8)
UNITER_MASKS = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # real lengths 3 and 2, padded to 4


def test_uniter_flops_count_real_tokens_only():
    from trainer.recipes import recipe_class

    work = recipe_class("uniter")(SimpleNamespace(model=TINY_STACK)).step_flops({"attn_masks": UNITER_MASKS}, "mlm")
    # forward: 2 P sum(l) + 4 n H sum(l^2) = 2*256*5 + 4*2*4*(9+4) = 2976; x3 fwd+bwd
    assert work.flops == 3 * 2976 == 8928
    # padded: 2 rows at 4: 2*256*8 + 4*2*4*(16+16) = 5120
    assert work.padded_flops == 3 * 5120
    assert (work.samples, work.tokens, work.padded_tokens) == (2, 5, 8)


def test_packed_uniter_flops_count_each_segment():
    from trainer.bench_flops import uniter_work

    # The same two samples packed into one row of 6 (data/packing.py: sample id per slot, -1 pad):
    # the useful FLOPs do not change (block-diagonal: 3^2 + 2^2, not 5^2), the padded ones are the row's.
    packed = {"attn_masks": UNITER_MASKS, "segment_ids": torch.tensor([[0, 0, 0, 1, 1, -1]])}
    work = uniter_work(packed, TINY_STACK)
    assert work.flops == 8928
    assert work.padded_flops == 3 * (2 * 256 * 6 + 4 * 2 * 4 * 36)  # 12672
    assert (work.samples, work.tokens, work.padded_tokens) == (2, 5, 6)


def test_packing_a_collated_batch_keeps_its_useful_flops(batches):
    from data.packing import pack_batch
    from trainer.bench_flops import uniter_work

    plain = uniter_work(batches["mlm"], TINY_STACK)
    packed = uniter_work(pack_batch(batches["mlm"], 64), TINY_STACK)
    assert (packed.samples, packed.tokens, packed.flops) == (plain.samples, plain.tokens, plain.flops)
    assert plain.flops < plain.padded_flops


def test_albef_flops_count_student_teacher_and_the_itm_fusions():
    from trainer.recipes import recipe_class

    # 1 text, 1 fusion, 1 ViT layer, all width 4, FFN 8 (128 weights a layer); 32 px / 16 = 4 patches
    # + [CLS] = T = 5 image tokens; captions of 3 and 2 real tokens padded to 4.
    m = SimpleNamespace(text_layers=1, fusion_layers=1, hidden_size=4, intermediate_size=8, vision_layers=1,
                        vision_width=4, vision_mlp=8, image_size=32, patch_size=16)
    batch = {"attn_mask": UNITER_MASKS}
    work = recipe_class("albef")(SimpleNamespace(model=m)).step_flops(batch, "albef")
    vit = 2 * (2 * 128 * 5 + 4 * 25 * 4)  # 3360: 2 images of 5 tokens
    text = 2 * 128 * 5 + 4 * 4 * 13  # 1488
    # fusion: the text layer's 1488 + cross Q, O 2*(2*16)*5 + K, V of 5 image tokens 2*(2*4*4)*5*2
    # + scores 4*4*5*5
    fusion = 1488 + 320 + 640 + 400  # 2848
    student = 3 * (vit + 2 * text + 4 * fusion)  # ITM: 3 fusion rows a pair; MLM: 1
    teacher = vit + 2 * text + fusion
    assert work.flops == student + teacher == 62368
    text_p, fusion_p = 2 * 128 * 8 + 4 * 4 * 32, 2560 + 512 + 640 + 640
    assert work.padded_flops == 3 * (vit + 2 * text_p + 4 * fusion_p) + vit + 2 * text_p + fusion_p == 90496
    assert (work.samples, work.tokens, work.padded_tokens) == (2, 5 + 2 * 5, 2 * (4 + 5))
    # Retrieval fine-tuning has no MLM: the student's text layers once and 3 ITM fusions, the teacher's
    # ViT and text layers once.
    from trainer.recipes.albef_retrieval import AlbefRetrievalRecipe

    retrieval = AlbefRetrievalRecipe(SimpleNamespace(model=m)).step_flops(batch, "retrieval")
    assert retrieval.flops == 3 * (vit + text + 3 * fusion) + vit + text == 45024
    from trainer.recipes.albef_grounding import AlbefGroundingRecipe  # retrieval fine-tuning on expressions

    assert AlbefGroundingRecipe(SimpleNamespace(model=m)).step_flops(batch, "grounding").flops == 45024
    # VE: one ViT, text and fusion pass a pair, forward + backward, and the momentum copy's forward.
    from trainer.recipes.albef_ve import AlbefVeRecipe

    ve = AlbefVeRecipe(SimpleNamespace(model=m)).step_flops(batch, "ve")
    assert ve.flops == 4 * (vit + text + fusion) == 30784
    # NLVR2: two pictures an example through the ViT and twice the fusion layers (each reading one picture);
    # text assignment the same fusion layers over one picture an example (reused as partners), no momentum copy.
    from trainer.recipes.albef_nlvr2 import AlbefNlvr2Recipe
    from trainer.recipes.albef_ta import AlbefTextAssignmentRecipe

    nlvr2 = AlbefNlvr2Recipe(SimpleNamespace(model=m)).step_flops(batch, "nlvr2")
    assert nlvr2.flops == 4 * (2 * vit + text + 2 * fusion) == 55616
    assert nlvr2.tokens == 5 + 2 * 2 * 5
    ta = AlbefTextAssignmentRecipe(SimpleNamespace(model=m)).step_flops(batch, "ta")
    assert ta.flops == 3 * (vit + text + 2 * fusion) == 31632
    # VQA: the question's encoder pass, then per answer (lengths 3, 2, 3) the decoder layer over its tokens,
    # cross-attending to the 4 padded question tokens, and the vocabulary projection (V 10) of each token;
    # forward + backward and the momentum copy's forward.
    from trainer.recipes.albef_vqa import AlbefVqaRecipe

    answers = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    vqa_model = SimpleNamespace(**vars(m), vocab_size=10)
    vqa = AlbefVqaRecipe(SimpleNamespace(model=vqa_model)).step_flops({**batch, "answer_mask": answers}, "vqa")
    # decoder: self-attention layer 2*128*8 + 4*4*22, cross Q/O 2*(2*16)*8, K/V 2*(2*4*4)*4*3, scores 4*4*4*8
    decoder = 2400 + 512 + 768 + 512
    assert vqa.flops == 4 * (vit + text + fusion + decoder + 2 * 4 * 10 * 8) == 50112


# ---------------------------------------------------------------- ALBEF, the sweep, out of memory


@pytest.fixture
def in_process(process_group, monkeypatch):
    """One process's group; DeepSpeedEngine asserts LOCAL_RANK is set, as a launcher would."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    return process_group


def _bench_config(path, overrides=()):
    from trainer.config import load_config

    return load_config(str(path), list(overrides))


@pytest.mark.slow
def test_albef_bench_runs_both_sides(tmp_path, pixel_data, in_process):
    from tests.conftest import write_albef_config
    from trainer.bench_train import TrainBenchConfig, format_train_result, run_train_bench

    # global batch 16 of micro-batches of 8: the baseline accumulates through the recipe's plan too
    cfg = _bench_config(write_albef_config(tmp_path, pixel_data, "albef", 4))
    result = run_train_bench(cfg, TrainBenchConfig(steps=2, warmup=1, batches_per_task=1))
    assert result["arch"] == "albef" and result["global_batch_size"] == 16 and result["micro_batch_size"] == 8
    for side in ("ours", "baseline"):
        assert result[side]["steps"] == 2 and result[side]["samples_per_s"] > 0
    assert result["work"]["samples"] == 2 * 16 and result["work"]["flops"] < result["work"]["padded_flops"]
    assert "ours/baseline" in format_train_result(result)


@pytest.mark.slow
def test_albef_sweep_fits_the_queue_to_each_point(tmp_path, pixel_data, in_process):
    from tests.conftest import write_albef_config
    from trainer.bench_sweep import format_sweep, run_sweep
    from trainer.bench_train import TrainBenchConfig

    cfg = _bench_config(write_albef_config(tmp_path, pixel_data, "albef", 4))
    result = run_sweep(cfg, TrainBenchConfig(steps=2, warmup=1, batches_per_task=1), (60, 150))
    per_sample = result["sweep"]["tokens_per_sample"]
    assert per_sample > 5  # 5 image tokens + the caption
    points = result["sweep"]["points"]
    assert [p["micro_batch_size"] for p in points] == [int(60 // per_sample), int(150 // per_sample)]
    for p in points:
        micro = p["micro_batch_size"]
        assert p["global_batch_size"] == micro and p["config_changes"]["data.micro_batch_size"] == micro
        assert p["config_changes"].get("model.queue_size", 48) % micro == 0
        assert p["work"]["samples"] == 2 * micro
        assert p["ours"]["steps"] == p["baseline"]["steps"] == 2
    assert "out of memory" not in format_sweep(result)


@pytest.mark.slow
def test_sweep_cli_records_every_point_and_side(tmp_path, demo_data):
    cfg = write_tiny_config(tmp_path / "b.yaml", demo_data, tmp_path / "run", tasks={"mlm": 1, "itm": 1})
    out = tmp_path / "sweep.json"
    proc = run_vlpt(["bench", "train", "--config", str(cfg), "--steps", "2", "--warmup", "1",
                     "--batches-per-task", "1", "--sweep", "64,160", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "train-sweep" and record["arch"] == "uniter" and record["complete"] is True
    per_sample = record["sweep"]["tokens_per_sample"]
    points = record["sweep"]["points"]
    assert [p["micro_tokens"] for p in points] == [64, 160]
    assert [p["micro_batch_size"] for p in points] == [int(64 // per_sample), int(160 // per_sample)]
    for p in points:
        assert p["global_batch_size"] == p["micro_batch_size"] and p["work"]["timed_steps"] == 2
        for side in ("ours", "baseline"):
            r = p[side]
            assert r["steps"] == 2 and r["peak_memory_bytes"] is None and "mfu" not in r
            assert r["samples_per_s"] == pytest.approx(p["work"]["samples"] / r["seconds"])
        assert p["ours_over_baseline"]["steps_per_s"] > 0
    assert f"{points[1]['micro_batch_size']:>6} ours" in proc.stdout


def test_sweep_refuses_bad_token_counts(tmp_path, demo_data):
    from trainer.bench_sweep import run_sweep
    from trainer.bench_train import TrainBenchConfig

    cfg = _bench_config(write_tiny_config(tmp_path / "b.yaml", demo_data, tmp_path / "run"))
    with pytest.raises(ValueError, match="positive token counts"):
        run_sweep(cfg, TrainBenchConfig(), (1024, 0))


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path, demo_data, process_group, monkeypatch):
    import trainer.bench_train as bench_train
    from trainer.bench_sweep import format_sweep, run_sweep

    ran = []

    def ours_that_runs_out(setup, model, bench):
        ran.append(setup.layout.micro_batch_size)
        if setup.layout.micro_batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return bench_train.Measured(1.0, {}, None)

    monkeypatch.setitem(bench_train.SIDES, "ours", ours_that_runs_out)
    monkeypatch.setitem(bench_train.SIDES, "baseline", lambda setup, model, bench: bench_train.Measured(2.0, {}, None))
    cfg = _bench_config(write_tiny_config(tmp_path / "b.yaml", demo_data, tmp_path / "run", tasks={"mlm": 1}))
    seen = []  # the points done at each call: the CLI rewrites its record then
    result = run_sweep(cfg, bench_train.TrainBenchConfig(steps=2, warmup=1, batches_per_task=1), (60, 1000, 60),
                       on_point=lambda r: seen.append((len(r["sweep"]["points"]), r["complete"])))
    assert seen == [(1, False), (2, False), (3, False)] and result["complete"] is True
    small, big, again = result["sweep"]["points"]
    assert big["micro_batch_size"] > 4 >= small["micro_batch_size"] and ran == [small["micro_batch_size"],
                                                                                 big["micro_batch_size"],
                                                                                 again["micro_batch_size"]]
    assert big["ours"] == {"oom": True, "error": "CUDA out of memory. Tried to allocate 20.00 GiB"}
    assert big["baseline"]["seconds"] == 2.0 and big["ours_over_baseline"] is None
    assert small["ours_over_baseline"]["steps_per_s"] == pytest.approx(2.0) and again["ours"]["seconds"] == 1.0
    assert "out of memory" in format_sweep(result)
