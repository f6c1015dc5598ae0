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
overwriting its successor's checkpoints.
"""

from __future__ import annotations

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


class Lease:
    def __init__(self, url: str, endpoint_url: str = "", ttl_s: float = 60.0, log=print) -> None:
        self.url, self.ttl_s, self.log = url, ttl_s, log
        self.fs, base = filesystem(url, endpoint_url)
        self.path = join(base, LEASE)
        self.me = {"holder": uuid.uuid4().hex, **_here(), "pid": os.getpid(), "since": time.time()}
        self.lost = ""  # why this writer no longer holds the lease, once it does not
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # torn by a writer killed mid-write on a filesystem without rename
            return {"holder": "", "unreadable": True}

    def _write(self) -> None:
        self._beat += 1
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(self.fs, self.path, json.dumps({**self.me, "beat": self._beat}).encode())

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
        previous, changed = self._read(), time.monotonic()
        deadline = changed + 2 * self.ttl_s
        while True:
            current = self._read()
            if current != previous:
                previous, changed = current, time.monotonic()
            free = (
                current is None
                or self._mine(current)
                or self._dead_here(current)
                or time.monotonic() - changed >= self.ttl_s
            )
            if free:
                if current is not None and not self._mine(current):
                    self.log(
                        f"lease: taking over {join(self.url, LEASE)} from "
                        f"{self.describe(current)}, which is gone"
                    )
                self._write()
                time.sleep(min(poll_s, self.ttl_s / 10))
                if self._mine(self._read()):
                    self._start_renewing()
                    return
                # another starter wrote at the same moment: watch it like any other writer
            elif time.monotonic() >= deadline:
                raise RunLeased(
                    f"{self.url} is being written by another run: {self.describe(current)}, "
                    f"whose lease ({join(self.url, LEASE)}) it renewed in the last "
                    f"{self.ttl_s:.0f} s. Stop that run first, or give this one another "
                    "train.output"
                )
            time.sleep(min(poll_s, self.ttl_s / 10))

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    current = self._read()
                    if not self._mine(current):
                        who = self.describe(current) if current else "nobody (it was removed)"
                        self.lost = f"the lease {join(self.url, LEASE)} is now held by {who}"
                        return
                    self._write()
                except Exception as e:  # a storage hiccup: the next beat tries again
                    self.log(f"warning: renewing {join(self.url, LEASE)} failed: {e!r}")

        self._thread = threading.Thread(target=renew, name="tessera-lease", daemon=True)
        self._thread.start()

    def check(self) -> str:
        """ "" while this writer holds the lease, else why not (checked before a checkpoint)."""
        return self.lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._mine(self._read()):
                self.fs.rm(self.path)
        except Exception as e:
            self.log(f"warning: releasing {join(self.url, LEASE)} failed: {e!r}")
