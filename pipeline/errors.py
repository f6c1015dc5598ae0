"""Errors that say what was wrong and where."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run: names the source, the key, the value and what is allowed."""


class FieldError(ValueError):
    """Raised by a config dataclass's own checks; the loader adds the file and the section."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; {allowed}")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise FieldError(field, value, allowed) unless ok."""
    if not ok:
        raise FieldError(field, value, allowed)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that is not plain data (a pickle that names code outside the
    allowlist): refused before anything loads it, with the file and the offending global."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, overwritten, not a checkpoint): names
    the file. Resuming then falls back to the complete checkpoint before it."""


class RunLeased(RuntimeError):
    """Another live run writes this run's folder (its lease is renewed): this one stops before
    writing anything, or, having lost the lease, before writing another checkpoint."""


class CheckpointNotFinished(OSError):
    """A checkpoint's files were written but it could not be marked complete or published (a
    rank could not read or sync them, an upload failed): the previous complete one stands."""


class StorageUnavailable(OSError):
    """Object storage did not answer for data.storage_deadline_s: the run stops (after saving a
    checkpoint where it can) with EXIT_STORAGE, instead of skipping good samples as bad."""


# The storage was unreachable for data.storage_deadline_s: "the data is fine, its store is
# down; run me again later". 69 is sysexits' EX_UNAVAILABLE.
EXIT_STORAGE = 69

# `tessera pretrain`, `finetune` and `run` exit with this status after SIGTERM once a checkpoint
# is saved: "preempted, run me again", distinct from success (0), failure (1) and a config or
# data error (2). 75 is sysexits' EX_TEMPFAIL; launch/slurm.sbatch requeues the job on it.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; the same command resumes it."""
