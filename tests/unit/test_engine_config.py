"""trainer/engine.py's DeepSpeed config: who clips and checks the gradients at each setting
(docs/design.md "The optimizer step"), and the ZeRO-1/2 communication keys."""
from __future__ import annotations

import pytest

from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
from trainer.engine import BatchLayout, build_deepspeed_config

LAYOUT = BatchLayout(micro_batch_size=8, grad_accum=2, world_size=1)


def ds_config(stage: int, dtype: str, device: str = "cpu", **parallel) -> dict:
    return build_deepspeed_config(OptimConfig(grad_clip=5.0), ParallelConfig(zero_stage=stage, **parallel),
                                  PrecisionConfig(dtype=dtype), LAYOUT, device)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero2_leaves_the_norm_and_the_clip_to_the_trainer(dtype):
    cfg = ds_config(2, dtype)
    assert cfg["gradient_clipping"] == 0.0 and cfg["zero_optimization"]["compute_grad_norm"] is False
    if dtype == "bf16":
        assert cfg["bf16"]["check_grad_overflow"] is False


@pytest.mark.parametrize("stage,dtype,extra", [(0, "fp32", {}), (0, "bf16", {}), (1, "bf16", {}), (3, "bf16", {}),
                                              (2, "fp16", {}), (2, "bf16", {"offload_optimizer": True})])
def test_elsewhere_deepspeed_clips_and_checks(stage, dtype, extra):
    cfg = ds_config(stage, dtype, **extra)
    assert cfg["gradient_clipping"] == 5.0 and "compute_grad_norm" not in cfg["zero_optimization"]
    if dtype == "bf16":
        assert cfg["bf16"]["check_grad_overflow"] is True


def test_the_trainer_clip_is_the_configured_one():
    """What the step clips to at ZeRO-2 is what DeepSpeed would have (divided under accum_sum_semantics)."""
    from trainer.engine import clip_norm

    assert clip_norm(OptimConfig(grad_clip=5.0), LAYOUT) == 5.0
    assert clip_norm(OptimConfig(grad_clip=5.0, accum_sum_semantics=True), LAYOUT) == 2.5


def test_overlap_comm_defaults_on_with_cuda_only():
    assert ds_config(2, "bf16", "cuda")["zero_optimization"]["overlap_comm"] is True
    assert ds_config(2, "bf16", "cpu")["zero_optimization"]["overlap_comm"] is False
    zero = ds_config(1, "fp32", "cpu", overlap_comm=True, reduce_bucket_size=1000, allgather_bucket_size=2000)
    assert zero["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}
    assert "overlap_comm" not in ds_config(0, "fp32")["zero_optimization"]


@pytest.mark.parametrize("key", ["reduce_bucket_size", "allgather_bucket_size"])
def test_bucket_sizes_must_be_positive(key):
    with pytest.raises(ValueError, match="must be positive"):
        ParallelConfig(zero_stage=2, **{key: 0})
