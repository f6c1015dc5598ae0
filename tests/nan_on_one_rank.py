"""Run `tessera pretrain` with rank 1's loss poisoned (NaN) on chosen objective calls.

    deepspeed --num_gpus 2 --no_local_rank tests/nan_on_one_rank.py CONFIG CALLS

CALLS is a comma-separated list of 1-based objective calls on rank 1 that return NaN. Used by
tests only: the production code has no fault hook.
"""

import sys

import torch

from pipeline import cli
from pipeline.train import trainer

config, calls = sys.argv[1], {int(c) for c in sys.argv[2].split(",")}
real = trainer.OBJECTIVES["supervised"]
count = 0


def poisoned(model, batch, **kw):
    global count
    loss, metrics = real(model, batch, **kw)
    count += 1
    if torch.distributed.get_rank() == 1 and count in calls:
        loss = loss * float("nan")
    return loss, metrics


trainer.OBJECTIVES["supervised"] = poisoned
sys.exit(cli.main(["pretrain", config]))
