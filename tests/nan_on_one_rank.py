"""Run `tessera pretrain` with rank 1's loss, or only its gradients, poisoned (NaN) on chosen
objective calls.

    deepspeed --num_gpus 2 --no_local_rank tests/nan_on_one_rank.py CONFIG CALLS [loss|grad]

CALLS is a comma-separated list of 1-based objective calls on rank 1 that are poisoned. "grad"
leaves the loss finite and makes every gradient NaN in backward. Used by tests only: the
production code has no fault hook.
"""

import sys

import torch

from pipeline import cli
from pipeline.train import trainer

config, calls = sys.argv[1], {int(c) for c in sys.argv[2].split(",")}
where = sys.argv[3] if len(sys.argv) > 3 else "loss"
real = trainer.OBJECTIVES["supervised"]
count = 0


class NanGradient(torch.autograd.Function):
    """The identity forward; NaN for every gradient flowing back through it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoned(model, batch, **kw):
    global count
    loss, metrics = real(model, batch, **kw)
    count += 1
    if torch.distributed.get_rank() == 1 and count in calls:
        loss = NanGradient.apply(loss) if where == "grad" else loss * float("nan")
    return loss, metrics


trainer.OBJECTIVES["supervised"] = poisoned
sys.exit(cli.main(["pretrain", config]))
