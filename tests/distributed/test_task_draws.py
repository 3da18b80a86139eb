"""Task mixing: the drawn task sequence is identical on every rank and follows the ratios."""
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_distributed
from trainer.task_mix import draw_task

RATIOS = {"itm": 6, "mlm": 8, "mrfr": 4, "mrc-kl": 4}  # UNITER's COCO mix
N = 2000


def draw_and_gather(rank, world):
    seq = [draw_task(42, step, RATIOS) for step in range(N)]
    names = sorted(RATIOS)
    codes = torch.tensor([names.index(t) for t in seq])
    gathered = [torch.zeros_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes)
    return [g.tolist() for g in gathered]


def test_two_ranks_draw_the_same_tasks_in_the_configured_ratios():
    per_rank = run_distributed(draw_and_gather, 2)
    rank0_view, rank1_view = per_rank
    assert rank0_view[0] == rank0_view[1] == rank1_view[0]
    seq = rank0_view[0]
    names = sorted(RATIOS)
    total = sum(RATIOS.values())
    for i, name in enumerate(names):
        frac = seq.count(i) / N
        assert abs(frac - RATIOS[name] / total) <= 0.03, (name, frac)
