"""A run folder (`train.output`) on any URL: a local path, or object storage such as s3://.

DeepSpeed, TensorBoard and the feature cache write to local files. For a remote run they write
to a local staging folder (TESSERA_STAGING, default ~/.cache/tessera/runs, one sub-folder per
run URL), and the remote copy is the run: nodes that share no filesystem, and a job that starts
on a fresh machine after a preemption, resume from it.

A checkpoint reaches the remote the way it is made locally, complete or ignored: every node
uploads the shards its ranks wrote, then rank 0 uploads `COMPLETE`, then `latest`. A reader that
finds no COMPLETE ignores the folder, as it does locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.storage import basename, filesystem, join, with_retries, write_atomic
from pipeline.train.checkpoint import COMPLETE, LATEST, STATE

CHECKPOINTS = "checkpoints"
WRITTEN_LAST = (STATE, COMPLETE)  # uploaded by publish_checkpoint once every shard is there


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_dir(url: str) -> Path:
    """Where this process reads and writes the run's files."""
    if not is_remote(url):
        return Path(url.removeprefix("file://"))
    root = os.environ.get("TESSERA_STAGING") or Path.home() / ".cache" / "tessera" / "runs"
    digest = hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:10]
    return Path(root) / f"{basename(url)}-{digest}"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(url: str, endpoint_url: str = "") -> str | None:
    """The name (step-NNNNNNN) of the run's newest complete checkpoint, wherever the run is."""
    if not is_remote(url):
        from pipeline.train.checkpoint import find_latest

        found = find_latest(local_dir(url) / CHECKPOINTS)
        return found.name if found else None
    found = complete_checkpoints(url, endpoint_url, newest_only=True)
    return found[-1] if found else None


def complete_checkpoints(url: str, endpoint_url: str = "", newest_only: bool = False) -> list[str]:
    """The names of the run's complete checkpoints, oldest first (only the newest with
    `newest_only`)."""
    if not is_remote(url):
        from pipeline.train.checkpoint import complete_checkpoints as local

        return [p.name for p in local(local_dir(url) / CHECKPOINTS)]
    fs, path = filesystem(url, endpoint_url)
    root = join(path, CHECKPOINTS)
    try:
        folders = _step_folders(fs.ls(root, detail=False))
    except FileNotFoundError:
        return []
    # Newest first, by their markers: a kill between a checkpoint's marker and `latest` leaves
    # `latest` one behind, so the pointer is for people and other tools, not for this.
    found = []
    for folder in reversed(folders):
        if fs.exists(join(root, folder, COMPLETE)):
            found.insert(0, folder)
            if newest_only:
                break
    return found


def pull_checkpoint(url: str, name: str, endpoint_url: str = "", into: Path | None = None) -> Path:
    """A remote checkpoint as a local folder (files already here at their size are kept); its
    COMPLETE marker is written last, so an interrupted download is never taken as complete.
    `into`: a folder of the caller's own (an evaluator's), not the run's local checkpoints."""
    local = (into or local_dir(url) / CHECKPOINTS) / name
    if not is_remote(url):
        return local
    fs, path = filesystem(url, endpoint_url)
    remote = join(path, CHECKPOINTS, name)
    files = {p: info["size"] for p, info in fs.find(remote, detail=True).items()}
    marker = join(remote, COMPLETE)
    if marker not in files:
        raise FileNotFoundError(f"{join(url, CHECKPOINTS, name)} is not complete on the remote")
    # A local marker proves nothing about this node's copy: the node that wrote the checkpoint
    # holds only its own ranks' shards. Every remote file is checked; the marker goes first
    # and comes back last, so a download cut short is never taken as complete.
    for f in files:
        _inside(local, f[len(remote) + 1 :], f)
    stale = [
        f for f in files if f != marker and not _same_size(local / f[len(remote) + 1 :], files[f])
    ]
    if not stale and (local / COMPLETE).is_file():
        return local
    (local / COMPLETE).unlink(missing_ok=True)

    def download(remote_file: str) -> None:
        target = local / remote_file[len(remote) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        with_retries(f"downloading {remote_file}", lambda: fs.get_file(remote_file, tmp))
        os.replace(tmp, target)

    each(download, stale)
    download(marker)
    return local


TRANSFERS = 8  # files moved at once: one stream rarely fills a node's link to object storage


def each(fn: Callable[[Any], None], items: list[Any]) -> None:
    """fn(item) for every item, TRANSFERS at a time in threads (s3fs serves them all from its
    one event loop); once all are done, the first error is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(TRANSFERS, len(items)), thread_name_prefix="tessera-io") as pool:
        futures = [pool.submit(fn, item) for item in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def _inside(folder: Path, relative: str, key: str) -> Path:
    """folder/relative, refused if it would leave `folder` (an object key with `..`, or an
    absolute one): a bucket's keys do not choose where this machine writes."""
    target = (folder / relative).resolve()
    if not relative or not target.is_relative_to(folder.resolve()):
        raise ValueError(f"object key {key} would be written outside {folder}; refused")
    return target


def _step_folders(paths: list[str]) -> list[str]:
    """The step-N folder names among `paths`, oldest step first (by number, not as text)."""
    from pipeline.train.checkpoint import step_of

    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
    return sorted((n for n in names if step_of(n) >= 0), key=step_of)


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def push_files(url: str, folder: Path, endpoint_url: str = "", skip: tuple[str, ...] = ()) -> None:
    """Upload every file under local `folder` (a path inside the run's local dir) to the same
    place in the remote run, except names in `skip`."""
    fs, path = filesystem(url, endpoint_url)
    base = local_dir(url)
    files = [
        file
        for file in sorted(p for p in folder.rglob("*") if p.is_file())
        if file.name not in skip
        and not file.name.endswith((".part", ".tmp"))
        and ".tmp-" not in file.name
    ]

    def upload(file: Path) -> None:
        remote = join(path, file.relative_to(base).as_posix())
        with_retries(f"uploading {file}", lambda: fs.put_file(str(file), remote))

    each(upload, files)


def publish_checkpoint(url: str, name: str, keep_last: int, endpoint_url: str = "") -> None:
    """After every node has pushed its shards: COMPLETE, then `latest`, then prune old ones."""
    fs, path = filesystem(url, endpoint_url)
    root = join(path, CHECKPOINTS)
    local = local_dir(url) / CHECKPOINTS / name
    for name_ in WRITTEN_LAST:
        data = (local / name_).read_bytes()
        with_retries(
            f"uploading {name_}", lambda n=name_, d=data: write_atomic(fs, join(root, name, n), d)
        )
    with_retries("uploading latest", lambda: write_atomic(fs, join(root, LATEST), name.encode()))
    from pipeline.train.checkpoint import step_of

    listed = fs.ls(root, detail=False)
    folders = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
    steps = _step_folders(listed)
    complete = [f for f in steps if fs.exists(join(root, f, COMPLETE))]
    old = complete[:-keep_last]
    old += [f for f in steps if f not in complete and step_of(f) < step_of(name)]
    old += [f for f in folders if ".tmp-" in f]  # a `latest` of a writer killed mid-write
    for folder in old:
        with_retries(f"removing {folder}", lambda f=folder: fs.rm(join(root, f), recursive=True))


def unpublish_checkpoint(url: str, name: str, endpoint_url: str = "") -> None:
    """Remove a checkpoint's COMPLETE marker on the remote (it cannot be read): from then on
    it is a half-written folder, which the next published checkpoint prunes."""
    fs, path = filesystem(url, endpoint_url)
    with_retries(f"unpublishing {name}", lambda: fs.rm(join(path, CHECKPOINTS, name, COMPLETE)))


def memory_root() -> Path:
    """Where checkpoints staged in memory live: a RAM-backed filesystem of this machine."""
    return Path(os.environ.get("TESSERA_MEMORY_STAGING") or "/dev/shm") / "tessera"


def memory_folder(url: str) -> Path:
    """The memory folder of a run's staging folder (named after the staging folder's path:
    two staging roots of one URL on a machine do not share it)."""
    staging = local_dir(url).absolute()
    digest = hashlib.sha1(str(staging).encode()).hexdigest()[:10]
    return memory_root() / f"{staging.name}-{digest}" / CHECKPOINTS


def stage_checkpoints(url: str, mode: str, need_bytes: float) -> str:
    """Put a remote run's local checkpoint folder on disk or in memory (`checkpoint.staging`),
    on a node's first rank. In memory, local_dir(url)/checkpoints is a link to a folder under
    memory_root(), so every path that names it (writes, hashing, uploads, resumes) reads and
    writes memory without knowing. auto takes memory when it can hold `need_bytes` (what is
    there already counts as room). What is moved across is a cache of published checkpoints:
    moved, not lost. Returns a line saying where and why."""
    folder = local_dir(url) / CHECKPOINTS
    memory = memory_folder(url)
    room, why = 0.0, f"no {memory_root().parent}"
    if mode != "disk" and memory_root().parent.is_dir():
        held = sum(f.stat().st_size for f in memory.rglob("*") if f.is_file())
        room = shutil.disk_usage(memory_root().parent).free + held
        why = f"{room / 1e9:.1f} GB free in memory for {need_bytes / 1e9:.1f} GB"
    if mode == "memory" and room < need_bytes:
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"checkpoint.staging: memory, but {why} (two of this node's checkpoints); "
            "use auto or disk"
        )
    in_memory = mode == "memory" or (mode == "auto" and room >= need_bytes)
    old = folder.resolve() if folder.is_symlink() else None  # (after a reboot, maybe gone)
    if in_memory:
        memory.mkdir(parents=True, exist_ok=True)
        if old is not None and old != memory.resolve():  # the memory root has moved
            folder.unlink()
            _move_memory(old, memory)
        elif old is None and folder.is_dir():
            _move_contents(folder, memory)
            folder.rmdir()
        if not folder.is_symlink():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(memory, target_is_directory=True)
    elif old is not None:
        folder.unlink()
        folder.mkdir()
        _move_memory(old, folder)
    where = f"in memory ({memory})" if in_memory else f"on disk ({folder})"
    return f"checkpoints staged {where}: {why}" if mode == "auto" else f"checkpoints staged {where}"


def memory_short(url: str, need_bytes: float) -> str:
    """Why a run's checkpoints staged in memory have no room for the next one (`need_bytes`,
    this node's share of one checkpoint), or "" when they have it or are on disk. The room was
    asked for two at the start; other processes may have filled the memory since."""
    folder = local_dir(url) / CHECKPOINTS
    if not folder.is_symlink():
        return ""
    free = shutil.disk_usage(memory_root().parent).free
    if free >= need_bytes:
        return ""
    return (
        f"{free / 1e9:.2f} GB free in memory ({memory_root().parent}) for the next checkpoint's "
        f"{need_bytes / 1e9:.2f} GB"
    )


def unstage_memory(url: str, keep: bool = True) -> None:
    """At the end of a run whose checkpoints are published: the memory they held is given
    back and the folder is on disk again, holding what memory held (the newest checkpoint, for
    the job's next stage on this node), or with `keep` False nothing (after SIGTERM, whose
    grace period is spent; the remote has them)."""
    folder = local_dir(url) / CHECKPOINTS
    if folder.is_symlink():
        target = folder.resolve()
        folder.unlink()
        folder.mkdir()
        _move_memory(target, folder if keep else None)


def _move_memory(source: Path, target: Path | None) -> None:
    """A memory folder's checkpoints moved to `target` (None: dropped), then the folder and
    its run's folder in memory_root() removed."""
    if target is not None and source.is_dir():
        _move_contents(source, target)
    shutil.rmtree(source, ignore_errors=True)
    with contextlib.suppress(OSError):
        source.parent.rmdir()  # once empty


def _move_contents(source: Path, target: Path) -> None:
    for child in source.iterdir():
        shutil.rmtree(target / child.name, ignore_errors=True)
        shutil.move(str(child), str(target / child.name))


def prune_local(url: str, keep: str) -> None:
    """A remote run keeps only its newest checkpoint in the staging folder (the remote holds
    the rest), so a long run does not fill the node's disk."""
    root = local_dir(url) / CHECKPOINTS
    for folder in root.glob("step-*"):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
