"""Run `tessera pretrain` and SIGKILL one rank at a chosen point, the way a preempted or
crashed node dies: the other ranks are left to notice (the launcher then stops them).

    deepspeed --num_gpus 2 --no_local_rank tests/kill_one_rank.py CONFIG POINT RANK N

POINT   step     rank RANK dies in its N-th objective call: mid-step, after a forward
        shards   rank RANK dies at the N-th checkpoint of this launch, after writing its
                 shards and RNG state, before the COMPLETE marker
        marker   rank 0 dies at the N-th checkpoint of this launch, after COMPLETE, before
                 `latest` is moved
        upload   (a remote run) every checkpoint's upload starts 2 s late, printing "UPLOAD
                 begin/end NAME after objective call K"; rank RANK dies in the N-th, after
                 its first file
        none     no kill

Prints "KILL <point> rank <r> ..." just before dying. Used by tests only: the production code
has no fault hook.
"""

import os
import signal
import sys
import time

import torch

from pipeline import cli, runs
from pipeline.train import checkpoint, trainer

config, point, victim, nth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
calls = {"objective": 0, "rng": 0, "latest": 0, "upload": 0}


def die(what: str) -> None:
    print(f"KILL {point} rank {torch.distributed.get_rank()} {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


real_objective = trainer.OBJECTIVES["supervised"]


def objective(model, batch, **kw):
    out = real_objective(model, batch, **kw)
    calls["objective"] += 1
    if point == "step" and torch.distributed.get_rank() == victim and calls["objective"] == nth:
        die(f"in objective call {nth}")
    return out


real_write = checkpoint._write_atomic


def write_atomic(path, text):
    rank = torch.distributed.get_rank()
    if path.name == checkpoint.LATEST and point == "marker" and rank == 0:
        calls["latest"] += 1
        if calls["latest"] == nth:
            die(f"after {text}/COMPLETE, before latest")
    real_write(path, text)
    if path.name.startswith("rng-rank") and point == "shards" and rank == victim:
        calls["rng"] += 1
        if calls["rng"] == nth:
            die(f"after writing the shards of {path.parent.name}, before COMPLETE")


real_push, real_retries = runs.push_files, runs.with_retries


def push_files(url, folder, endpoint_url="", skip=()):
    if point != "upload" or "checkpoints" not in folder.parts:
        return real_push(url, folder, endpoint_url, skip)
    calls["upload"] += 1
    print(f"UPLOAD begin {folder.name} after objective call {calls['objective']}", flush=True)
    time.sleep(2)
    dying = torch.distributed.get_rank() == victim and calls["upload"] == nth
    files = []

    def with_retries(what, fn, *args, **kwargs):
        result = real_retries(what, fn, *args, **kwargs)
        files.append(what)
        if dying:
            die(f"mid-upload of {folder.name}, after {what}")
        return result

    runs.with_retries = with_retries
    try:
        real_push(url, folder, endpoint_url, skip)
    finally:
        runs.with_retries = real_retries
    print(f"UPLOAD end {folder.name} after objective call {calls['objective']}", flush=True)


trainer.OBJECTIVES["supervised"] = objective
checkpoint._write_atomic = write_atomic
runs.push_files = push_files
sys.exit(cli.main(["pretrain", config]))
