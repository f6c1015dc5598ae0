"""Sharded checkpoints that are complete or ignored.

  checkpoints/step-0000500/     DeepSpeed's ZeRO shards (every rank writes its own)
                                rng-rank00000.json ... each rank's RNG states
                                trainer.json           step, stream cursor of all ranks, config
                                COMPLETE               written last, once every rank has written:
                                                       the size and sha256 of every file above
  checkpoints/latest            the newest complete tag, replaced atomically after COMPLETE

A checkpoint is written as `step-0000500.partial` and renamed once its marker is there, so a
folder named for a step was whole when it got that name. Resuming reads `latest` and checks its
COMPLETE marker; if either is missing or stale it takes the newest directory that has one. A
directory without COMPLETE (a kill while writing) is never loaded, and is removed once a newer
checkpoint is complete. Files that no longer match their marker are refused on load (`verify`),
and the trainer falls back to the checkpoint before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointNotFinished, RunLeased

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer.json"
PARTIAL = ".partial"  # suffix of a checkpoint folder being written


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


def digest(path: Path, sync: bool = False) -> list[Any]:
    """[size, sha256 hex] of a file; with `sync`, once it is on disk (a marker written after
    this cannot outlive the data it vouches for in a power loss or a kernel crash)."""
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def listing(folder: Path) -> list[str]:
    """The files a marker vouches for: everything under `folder` but the marker itself and
    other writers' temporary files, as sorted relative paths."""
    names = (
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != COMPLETE and ".tmp-" not in p.name
    )
    return sorted(names)


def manifest(path: Path) -> dict[str, list[Any]]:
    """What a checkpoint's COMPLETE marker records of its files (name: [size, sha256]); empty
    for a checkpoint written before markers recorded them."""
    return json.loads((path / COMPLETE).read_text() or "{}").get("files", {})


def verify(path: Path, names: list[str] | None = None) -> None:
    """Raise CorruptCheckpoint naming the first of `names` (default: every file the marker
    records) that is missing or differs from the marker's size and sha256."""
    from pipeline.errors import CorruptCheckpoint

    files = manifest(path)
    for name in sorted(files) if names is None else names:
        size, sha = files[name]
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing; its COMPLETE marker records it")
        got_size, got_sha = digest(file)
        if (got_size, got_sha) != (size, sha):
            raise CorruptCheckpoint(
                f"{file}: {got_size} bytes, sha256 {got_sha[:16]}..., but its COMPLETE marker "
                f"records {size} bytes, sha256 {sha[:16]}...: changed since it was written"
            )


def write_marker(path: Path, files: dict[str, list[Any]], **fields: Any) -> None:
    _write_atomic(path / COMPLETE, json.dumps({**fields, "time": time.time(), "files": files}))


@dataclass
class Pending:
    """A checkpoint whose files every rank has written, not yet complete (`finish`)."""

    root: Path
    step: int
    state: dict[str, Any]
    keep_last: int

    @property
    def name(self) -> str:
        return tag(self.step)

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def work(self) -> Path:
        return self.root / f"{self.name}{PARTIAL}"


def write(
    engine, root: Path, step: int, state: dict[str, Any], comm, keep_last: int
) -> Pending | None:
    """The part of a save that holds training, on every rank: DeepSpeed writes its shards into
    `step-N.partial`. None when the step's checkpoint is complete already."""
    pending = Pending(root, step, state, keep_last)
    name, path, work = pending.name, pending.path, pending.work
    # A complete checkpoint is never written again (SIGTERM at a checkpoint step, a drain
    # notice right after one, a resume that stops at once): rewriting it in place would leave it
    # torn, and trusted, if the writer died. Asked of every rank: on a remote run only the
    # first node's staging folder holds the marker.
    if comm.any(is_complete(path), f"whether {name} is already complete"):
        return None
    if comm.folder_leader:  # what a killed save of this step left, per folder
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)  # not complete: asked above
    comm.barrier(f"clearing what a killed save of {name} left")
    engine.save_checkpoint(str(root), tag=work.name, save_latest=False)
    _write_atomic(work / f"rng-rank{comm.rank:05d}.json", json.dumps(rng_state()))
    comm.barrier(f"every rank to write its shards of {name}")
    return pending


def finish(pending: Pending, comm, lost: Callable[[], str] = str) -> Path:
    """The rest, on every rank, which may run behind training (comm.background()): the files
    synced and hashed, once per copy of the folder, the work split among the ranks that see
    it; the marker, recording them all (on a remote run the nodes' folders hold different
    shards, and the union is what is published), then the rename and `latest`. `lost()`, asked
    on rank 0 just before the marker, says why this run may no longer write (its lease)."""
    name, path, work = pending.name, pending.path, pending.work
    mine, problem, leased = {}, "", ""
    try:
        mine = {n: digest(work / n, sync=True) for n in comm.my_share(listing(work))}
        if comm.folder_leader:
            for sub, _, _ in os.walk(work):
                _fsync_dir(Path(sub))
    except OSError as e:
        problem = f"rank {comm.rank}: {e!r}"
    if comm.rank == 0:
        leased = lost()
    parts = comm.gather((mine, problem, leased), f"the digests of {name}'s files")
    if parts[0][2]:
        raise RunLeased(f"stopped before marking {name} complete: {parts[0][2]}")
    problems = [p for _, p, _ in parts if p]
    if problems:
        raise CheckpointNotFinished(f"{name} not marked complete: {'; '.join(problems)}")
    files = {n: d for part, _, _ in parts for n, d in part.items()}
    if comm.rank == 0:
        text = json.dumps(pending.state)
        _write_atomic(work / STATE, text)
        files[STATE] = [len(text.encode()), hashlib.sha256(text.encode()).hexdigest()]
        write_marker(work, dict(sorted(files.items())), step=pending.step)
    comm.barrier(f"rank 0 to mark {name} complete")
    if comm.folder_leader:
        try:
            work.rename(path)
        except FileNotFoundError:  # another machine's leader renamed the shared folder
            if not path.is_dir():
                raise
        _fsync_dir(pending.root)
    comm.barrier(f"the rename of {work.name} to {name}")
    if comm.rank == 0:
        _write_atomic(pending.root / LATEST, name)
        _prune(pending.root, pending.keep_last)
    comm.barrier(f"rank 0 to point {LATEST} at {name}")
    return path


class Behind:
    """At most one checkpoint finishing behind training (a thread per rank). `wait` joins it
    and raises what it raised, on the training thread."""

    def __init__(self) -> None:
        self.name = ""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, name: str, fn: Callable[[], Any]) -> None:
        assert not self.busy, f"{self.name} is still finishing"

        def target() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self.name, self._error = name, None
        self._thread = threading.Thread(target=target, name=f"tessera-{name}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once nothing is finishing (False if it still is after timeout_s); raises the
        finishing thread's error, once."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    newest = step_of(complete[-1].name)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for half in root.glob("step-*"):  # half-written by a killed run, superseded now
        step = step_of(half.name.removesuffix(PARTIAL))
        if not is_complete(half) and 0 <= step < newest:
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
    refuse_unsafe_pickles(source)  # its files' digests: checked by the caller, split by rank
    loaded, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {path}")
    rng = path / f"rng-rank{rank:05d}.json"
    if rng.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        set_rng_state(json.loads(rng.read_text()))
    return state
