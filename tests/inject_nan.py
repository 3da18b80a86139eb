"""`python -m tests.inject_nan <rank|all> <step,step,...> <vlpt args>`: `vlpt` whose training loss
is NaN (and so are its gradients) in the given optimizer steps on the given rank."""
import os
import sys

from trainer.models.pretrain import UniterForPretraining
from vlpt.cli import main

RANK, STEPS = sys.argv[1], {int(s) for s in sys.argv[2].split(",")}
_forward = UniterForPretraining.forward
_calls = [0]


def forward_with_nan(self, batch, task, *args):
    result = _forward(self, batch, task, *args)
    if self.training:
        _calls[0] += 1  # one micro-batch per step in these runs: call k is step k
        if _calls[0] in STEPS and RANK in ("all", os.environ.get("RANK", "0")):
            result.losses = {name: loss * float("nan") for name, loss in result.losses.items()}
    return result


UniterForPretraining.forward = forward_with_nan
sys.exit(main(sys.argv[3:]))
