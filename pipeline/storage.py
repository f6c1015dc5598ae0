"""Every location is an fsspec URL: a local path, file://, s3://, memory://.

S3 takes its endpoint from `AWS_ENDPOINT_URL` (read by botocore itself) or from an explicit
`endpoint_url`; keys come from the environment or the cloud's role, never from configs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from pipeline.errors import StorageUnavailable

log = logging.getLogger(__name__)

# Reads are split into chunks this large, so a dropped connection costs at most one chunk.
READ_CHUNK = 8 << 20
# First wait after a transient error; doubles per retry, capped at 5 s.
BACKOFF = 0.05
# Errors that say the object is not there or not ours; retrying cannot help.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def filesystem(url: str, endpoint_url: str = "") -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL. A fresh instance, safe to use after fork."""
    options: dict[str, Any] = {"skip_instance_cache": True}
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a") and endpoint_url:
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    if protocol == "memory":  # memory:// is one store per process; a fresh instance must share it
        options.pop("skip_instance_cache")
    return fsspec.core.url_to_fs(url, **options)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def basename(url: str) -> str:
    """The last path component of a URL: "s3://b/data/digits/" -> "digits"."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def with_retries(
    what: str,
    fn: Callable[[], Any],
    retries: int = 6,
    backoff: float | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    deadline_s: float | None = None,
) -> Any:
    """Call fn, retrying transient storage errors (HTTP 503 SlowDown, connection resets,
    timeouts) with exponential backoff; permanent errors (missing, forbidden) raise at once.

    With `deadline_s`, retries go on (backoff capped at 5 s) until that long has passed since
    the first failure, and then raise StorageUnavailable: the storage is down, which is not the
    same as the data being bad, and a reader must not skip samples for it."""
    first_failure = None
    attempt = 0
    while True:
        try:
            return fn()
        except PERMANENT:
            raise
        except Exception as e:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if deadline_s is not None and now - first_failure >= deadline_s:
                raise StorageUnavailable(
                    f"{what}: storage unreachable for {now - first_failure:.0f} s "
                    f"({attempt} retries; data.storage_deadline_s is {deadline_s:g}): {e!r}"
                ) from e
            if deadline_s is None and attempt == retries:
                raise OSError(f"{what}: still failing after {retries} retries: {e!r}") from e
            if on_retry is not None:
                on_retry(e)
            delay = min((BACKOFF if backoff is None else backoff) * 2 ** min(attempt, 20), 5.0)
            log.debug("%s: %r; retrying in %.2fs", what, e, delay)
            time.sleep(delay)
            attempt += 1


def read_range(
    fs: AbstractFileSystem,
    path: str,
    start: int,
    end: int,
    on_retry: Callable[[BaseException], None] | None = None,
    deadline_s: float | None = None,
) -> bytes:
    """Bytes [start, end) of a file, fewer if the file is shorter (a truncated file).

    Read in chunks; a chunk that fails transiently is retried from where it began, so a reset
    connection in the middle of a shard re-reads at most one chunk.
    """
    parts = []
    pos = start
    while pos < end:
        stop = min(pos + READ_CHUNK, end)
        chunk = with_retries(
            f"reading {path} bytes {pos}-{stop}",
            lambda pos=pos, stop=stop: fs.cat_file(path, start=pos, end=stop),
            on_retry=on_retry,
            deadline_s=deadline_s,
        )
        parts.append(chunk)
        if len(chunk) < stop - pos:  # end of file before `end`
            break
        pos = stop
    return b"".join(parts)
