"""Run `tessera pretrain` and SIGKILL one rank at a chosen point, the way a preempted or
crashed node dies: the other ranks are left to notice (the launcher then stops them).

    deepspeed --num_gpus 2 --no_local_rank tests/kill_one_rank.py CONFIG POINT RANK N [ARGS]

POINT   step     rank RANK dies in its N-th objective call: mid-step, after a forward
        shards   rank RANK dies at the N-th checkpoint of this launch, after writing its
                 shards and RNG state, before the COMPLETE marker
        marker   rank 0 dies at the N-th checkpoint of this launch, after COMPLETE, before
                 `latest` is moved
        upload   (a remote run) every checkpoint's upload starts 2 s late, printing "UPLOAD
                 begin/end NAME after objective call K"; rank RANK dies in the N-th, after
                 its first file
        extract  (`tessera evaluate CONFIG ARGS`) rank RANK dies in its N-th call of the
                 model's feature extractor, progress recorded after every batch
        commit   (`tessera evaluate CONFIG ARGS`) rank 0 dies at the N-th record of an
                 extraction's progress: the arrays flushed, the record written beside the old
                 one, not yet in its place
        none     no kill

Prints "KILL <point> rank <r> ..." just before dying. Used by tests only: the production code
has no fault hook.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from pipeline import cli, runs
from pipeline.evaluate import features
from pipeline.evaluate import run as evaluate_run
from pipeline.train import checkpoint, trainer

config, point, victim, nth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
calls = {"objective": 0, "rng": 0, "latest": 0, "upload": 0, "extract": 0, "commit": 0}


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


real_extractor = evaluate_run.model_extractor


def model_extractor(*args, **kwargs):
    fn = real_extractor(*args, **kwargs)

    def counted(batch):
        calls["extract"] += 1
        if (
            point == "extract"
            and torch.distributed.get_rank() == victim
            and calls["extract"] == nth
        ):
            die(f"in extractor call {nth}")
        return fn(batch)

    return counted


real_replace = Path.replace


def replace(self, target):
    if point == "commit" and Path(target).name == features.PROGRESS:
        calls["commit"] += 1
        if calls["commit"] == nth:
            die(f"at progress record {nth}, before it replaced the last")
    return real_replace(self, target)


trainer.OBJECTIVES["supervised"] = objective
checkpoint._write_atomic = write_atomic
runs.push_files = push_files
evaluate_run.model_extractor = model_extractor
features.COMMIT_S = 0.0  # a record after every batch
Path.replace = replace
command = "evaluate" if point in ("extract", "commit") else "pretrain"
sys.exit(cli.main([command, config, *sys.argv[5:]]))
