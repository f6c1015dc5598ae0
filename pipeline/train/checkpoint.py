"""Sharded checkpoints that are complete or ignored.

  checkpoints/step-0000500/     DeepSpeed's ZeRO shards (every rank writes its own)
                                rng-rank00000.json ... each rank's RNG states
                                trainer.json           step, stream cursor of all ranks, config
                                COMPLETE               written last, once every rank has written
  checkpoints/latest            the newest complete tag, replaced atomically after COMPLETE

Resuming reads `latest` and checks its COMPLETE marker; if either is missing or stale it takes
the newest directory that has one. A directory without COMPLETE (a kill while writing) is never
loaded, and is removed once a newer checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer.json"


def tag(step: int) -> str:
    return f"step-{step:07d}"


def step_of(name: str) -> int:
    """The step a checkpoint folder's name holds; -1 for any other name. Tags are compared by
    this, never as text: past 9,999,999 steps "step-10000000" sorts before "step-9999999"."""
    head, _, digits = name.partition("-")
    return int(digits) if head == "step" and digits.isdigit() else -1


def _write_atomic(path: Path, text: str) -> None:
    """The file whole or not at all, on disk (fsynced, and its directory) before it counts."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder` and the folders themselves on disk: a marker written after
    this cannot outlive the data it vouches for in a power loss or a kernel crash."""
    for sub, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(sub, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(sub))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain JSON data (nothing to unpickle on load)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = (p for p in root.glob("step-*") if step_of(p.name) >= 0 and is_complete(p))
    return sorted(found, key=lambda p: step_of(p.name))


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            newer = [p for p in complete_checkpoints(root) if step_of(p.name) > step_of(named.name)]
            return newer[-1] if newer else named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save(engine, root: Path, step: int, state: dict[str, Any], comm, keep_last: int) -> Path:
    """Every rank calls this (comm: pipeline.train.distributed.Comm); returns the checkpoint
    directory once it is complete."""
    name = tag(step)
    path = root / name
    # A complete checkpoint is never written again (SIGTERM at a checkpoint step, a drain
    # notice right after one, a resume that stops at once): rewriting it in place would leave it
    # torn, and trusted, if the writer died. Asked of every rank: on a remote run only the
    # first node's staging folder holds the marker.
    if comm.any(is_complete(path), f"whether {name} is already complete"):
        return path
    engine.save_checkpoint(str(root), tag=name, save_latest=False)
    _write_atomic(path / f"rng-rank{comm.rank:05d}.json", json.dumps(rng_state()))
    _fsync_tree(path)
    comm.barrier(f"every rank to write its shards of {name}")
    if comm.rank == 0:
        _write_atomic(path / STATE, json.dumps(state))
        _write_atomic(path / COMPLETE, json.dumps({"step": step, "time": time.time()}))
        _write_atomic(root / LATEST, name)
        _prune(root, keep_last)
    comm.barrier(f"rank 0 to mark {name} complete")
    return path


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    newest = step_of(complete[-1].name)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for half in root.glob("step-*"):  # half-written by a killed run, superseded now
        if not is_complete(half) and 0 <= step_of(half.name) < newest:
            shutil.rmtree(half, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / STATE).read_text())


def universal_path(path: Path) -> Path:
    """Where the universal-format copy of a checkpoint goes (outside the step-* pruning)."""
    return path.parent / "universal" / path.name


def load(engine, path: Path, rank: int, universal: bool = False) -> dict[str, Any]:
    """Load a complete checkpoint (or its universal copy) into the engine; returns the trainer
    state."""
    from pipeline.train.engine import refuse_unsafe_pickles

    state = read_state(path)
    source = universal_path(path) if universal else path
    refuse_unsafe_pickles(source)
    loaded, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {path}")
    rng = path / f"rng-rank{rank:05d}.json"
    if rng.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        set_rng_state(json.loads(rng.read_text()))
    return state
