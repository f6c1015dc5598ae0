"""One writer per run: a lease in the run folder, so two jobs never write one run's checkpoints.

  train.output/LEASE    {"holder", "host", "machine", "pid_ns", "pid", "since", "beat"}

A second writer is an ordinary accident: SLURM requeues a job while the old one still runs on a
node that lost its network, a user starts the same config twice, a retried worker group starts
before the old one is gone. Both would prune and overwrite each other's checkpoints.

Rank 0 takes the lease before anything is read or written, and a thread of it rewrites the
lease every `ttl_s / 4` (a thread, so a long step or a slow save never lets it lapse). A
starting run takes a lease that is absent, its own, or left by a dead writer: one on this
machine (same boot, same PID namespace) whose process is gone takes no wait; one elsewhere is
dead when it has not changed for `ttl_s` of the starter's own clock (no two machines' clocks are
compared). A lease still renewed after `2 * ttl_s` belongs to a live writer: the starter stops
with RunLeased, naming it. The holder checks before each checkpoint that the lease is
still its own (fencing): a writer that stalled past `ttl_s` and was replaced stops instead of
overwriting its successor's checkpoints. Every write of the lease is a compare-and-swap against
the lease as last read (`_Slot`), so the judgement "free" and the taking are one step.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.errors import RunLeased
from pipeline.storage import filesystem, join, write_atomic

LEASE = "LEASE"


def _here() -> dict[str, Any]:
    from pipeline.train.distributed import _machine_id

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {"host": socket.gethostname(), "machine": _machine_id(), "pid_ns": pid_ns}


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process of that number: alive
        return False
    return False


class _Slot:
    """The lease file, replaced only if it still holds what was read (compare-and-swap), so two
    starters that both saw it free cannot both take it, and a writer that was replaced cannot
    renew over its successor. On S3, a conditional PUT (If-Match on the ETag read, If-None-Match
    when there was none); on a local disk, the compare and the write under a lock file. Other
    stores: a plain write (last writer wins; the holder notices at its next renewal)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.kind = "s3" if protocol in ("s3", "s3a") else "local" if protocol == "file" else ""

    def read(self) -> tuple[bytes | None, Any]:
        """(contents, version); (None, None) when there is no lease."""
        try:
            if self.kind == "s3":
                self.fs.invalidate_cache(self.path)
                version = self.fs.info(self.path)["ETag"]  # first: a newer body fails the swap
                return self.fs.cat_file(self.path), version
            data = self.fs.cat_file(self.path)
            return data, data
        except FileNotFoundError:
            return None, None

    def swap(self, seen: Any, data: bytes) -> Any:
        """Write `data` if the lease is still the one read as `seen`: its new version, or None
        when it changed (someone else wrote or removed it)."""
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if self.kind == "s3":
            condition = {"IfMatch": seen} if seen is not None else {"IfNoneMatch": "*"}
            try:
                return self.fs.pipe_file(self.path, data, **condition)["ETag"]
            except OSError as e:
                if _precondition_failed(e):
                    return None
                raise
        if self.kind == "local":
            with open(f"{self.path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.read()[0] != seen:
                    return None
                write_atomic(self.fs, self.path, data)
                return data
        write_atomic(self.fs, self.path, data)
        return data

    def remove(self, seen: Any) -> None:
        if self.kind == "local":
            with open(f"{self.path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.read()[0] == seen:
                    self.fs.rm(self.path)
            return
        if self.read()[1] == seen:  # S3 deletes unconditionally: a window of one round trip
            self.fs.rm(self.path)


def _precondition_failed(e: OSError) -> bool:
    """A conditional PUT refused: 412 PreconditionFailed, 409 ConditionalRequestConflict (two
    conditional writes at once), or NoSuchKey (If-Match on a removed lease)."""
    if isinstance(e, FileExistsError | FileNotFoundError):
        return True
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


class Lease:
    def __init__(self, url: str, endpoint_url: str = "", ttl_s: float = 60.0, log=print) -> None:
        self.url, self.ttl_s, self.log = url, ttl_s, log
        self.fs, base = filesystem(url, endpoint_url)
        self.path = join(base, LEASE)
        self.slot = _Slot(self.fs, self.path)
        self.me = {"holder": uuid.uuid4().hex, **_here(), "pid": os.getpid(), "since": time.time()}
        self.lost = ""  # why this writer no longer holds the lease, once it does not
        self._beat = 0
        self._version: Any = None  # of the lease as this writer last wrote it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn = threading.Lock()  # the renewing thread and check() take turns

    def _read(self) -> tuple[dict[str, Any] | None, Any]:
        data, version = self.slot.read()
        if data is None:
            return None, None
        try:
            return json.loads(data), version
        except ValueError:  # torn by a writer killed mid-write on a filesystem without rename
            return {"holder": "", "unreadable": True}, version

    def _write(self, seen: Any) -> bool:
        """Write this writer's lease over the one read as `seen`; False if it changed since."""
        self._beat += 1
        version = self.slot.swap(seen, json.dumps({**self.me, "beat": self._beat}).encode())
        if version is None:
            return False
        self._version = version
        return True

    def _mine(self, lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease.get("holder") == self.me["holder"]

    def _dead_here(self, lease: dict[str, Any]) -> bool:
        here = _here()
        same = all(lease.get(k) == here[k] for k in ("machine", "pid_ns")) and here["pid_ns"]
        return bool(same) and isinstance(lease.get("pid"), int) and _process_gone(lease["pid"])

    @staticmethod
    def describe(lease: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("since", 0)))
        return f"host {lease.get('host', '?')} pid {lease.get('pid', '?')} (since {since})"

    def acquire(self, poll_s: float = 1.0) -> None:
        """Take the lease: at once if it is free, after ttl_s of silence if its writer cannot be
        asked; RunLeased if it is still being renewed after 2 * ttl_s (a retried worker group
        waits here for the old one to go)."""
        previous, changed = self._read()[1], time.monotonic()
        deadline = changed + 2 * self.ttl_s
        while True:
            current, version = self._read()
            if version != previous:
                previous, changed = version, time.monotonic()
            free = (
                current is None
                or self._mine(current)
                or self._dead_here(current)
                or time.monotonic() - changed >= self.ttl_s
            )
            if free and self._write(version):  # only over the lease just judged free
                if current is not None and not self._mine(current):
                    self.log(
                        f"lease: took over {join(self.url, LEASE)} from "
                        f"{self.describe(current)}, which is gone"
                    )
                self._start_renewing()
                return
            if not free and time.monotonic() >= deadline:
                raise RunLeased(
                    f"{self.url} is being written by another run: {self.describe(current)}, "
                    f"whose lease ({join(self.url, LEASE)}) it renewed in the last "
                    f"{self.ttl_s:.0f} s. Stop that run first, or give this one another "
                    "train.output"
                )
            if not free:
                time.sleep(min(poll_s, self.ttl_s / 10))
            # else another starter wrote since the read: look again, at once

    def _still_mine(self) -> bool:
        """Whether the lease is this writer's; sets `lost` when it is not. A write whose answer
        was lost (it landed, the reply did not) is recognised by its holder and adopted."""
        current, version = self._read()
        if self._mine(current):
            self._version = version
            return True
        who = self.describe(current) if current else "nobody (it was removed)"
        self.lost = f"the lease {join(self.url, LEASE)} is now held by {who}"
        return False

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    with self._turn:
                        if not self._write(self._version) and not self._still_mine():
                            return
                except Exception as e:  # a storage hiccup: the next beat tries again
                    self.log(f"warning: renewing {join(self.url, LEASE)} failed: {e!r}")

        self._thread = threading.Thread(target=renew, name="tessera-lease", daemon=True)
        self._thread.start()

    def check(self) -> str:
        """ "" while this writer holds the lease, else why not. Asked before every checkpoint,
        with a read of its own: a renewal may be up to ttl_s / 4 old."""
        if not self.lost:
            try:
                with self._turn:
                    self._still_mine()
            except Exception as e:  # the store did not answer: the renewals decide
                self.log(f"warning: checking {join(self.url, LEASE)} failed: {e!r}")
        return self.lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._turn:
                if not self.lost and self._version is not None:
                    self.slot.remove(self._version)  # only the lease as this writer left it
        except Exception as e:
            self.log(f"warning: releasing {join(self.url, LEASE)} failed: {e!r}")
