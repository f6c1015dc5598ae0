"""Where a stream is in its epoch, and what it has counted: the state a checkpoint carries.

Every rank holds a `Cursor`. Two parts of it have owners, and merging keeps to them, so that a
run resumed any number of times on any number of ranks counts every sample once:

- `consumed[j]`, the batches reader j has delivered, is known only by the rank that runs
  reader j. Another rank's copy (from the checkpoint it resumed from) goes stale as soon as
  training continues, so a rank reports only its own readers.
- The tally (quarantined samples, positions seen and errors this epoch, storage retries) is
  split in two: `inherited`, the merged tally of the checkpoint the run resumed from, the same
  on every rank; and `own`, what this rank counted since. Merging adds the inherited tally once
  and every rank's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.data.order import Phase

STATE_FORMAT = "tessera-stream/1"
TALLY = ("quarantine", "seen", "errors", "retries")


class CursorError(RuntimeError):
    """A cursor that cannot be restored or merged."""


@dataclass(frozen=True)
class Tally:
    """Samples quarantined so far (key, shard, reason, epoch); positions delivered (good and
    quarantined) and unreadable this epoch; storage retries so far."""

    quarantine: tuple[dict[str, Any], ...] = ()
    seen: int = 0
    errors: int = 0
    retries: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.quarantine + other.quarantine,
            self.seen + other.seen,
            self.errors + other.errors,
            self.retries + other.retries,
        )

    def next_epoch(self) -> Tally:
        """Quarantine and retries go on; the error budget's counts start over."""
        return replace(self, seen=0, errors=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quarantine": list(self.quarantine),
            "seen": self.seen,
            "errors": self.errors,
            "retries": self.retries,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(tuple(d["quarantine"]), int(d["seen"]), int(d["errors"]), int(d["retries"]))


@dataclass
class Cursor:
    phase: Phase
    consumed: dict[int, int] = field(default_factory=dict)  # reader -> batches delivered
    inherited: Tally = field(default_factory=Tally)  # the same on every rank
    own: Tally = field(default_factory=Tally)  # this rank's since it started or resumed

    @property
    def tally(self) -> Tally:
        return self.inherited + self.own

    @property
    def seen(self) -> int:
        return self.tally.seen

    @property
    def errors(self) -> int:
        return self.tally.errors

    @property
    def retries(self) -> int:
        return self.tally.retries

    @property
    def quarantine(self) -> tuple[dict[str, Any], ...]:
        return self.tally.quarantine

    def count(self, good: int, errors: list[dict[str, Any]], retries: int) -> None:
        """A batch delivered: `good` samples, `errors` quarantined, after `retries` retries."""
        epoch = {"epoch": self.phase.epoch}
        self.own = self.own + Tally(
            tuple({**e, **epoch} for e in errors), good + len(errors), len(errors), retries
        )

    def next_epoch(self, phase: Phase) -> Cursor:
        return Cursor(phase, inherited=self.inherited.next_epoch(), own=self.own.next_epoch())


def rank_state(cursor: Cursor, readers: list[int], dataset: str, seed: int) -> dict[str, Any]:
    """One rank's view (JSON): its own readers' positions, the inherited and its own tally."""
    return {
        "format": STATE_FORMAT,
        "dataset": dataset,
        "seed": seed,
        "phase": cursor.phase.to_dict(),
        "consumed": {str(j): n for j, n in cursor.consumed.items() if j in readers},
        "inherited": cursor.inherited.to_dict(),
        **cursor.own.to_dict(),
    }


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One cursor from every rank's `Stream.state_dict()` (gathered over ranks): every
    reader's position from the rank that runs it, and the tally counted once. The result holds
    the totals and no `inherited` part; `Stream.load_state_dict` takes either form."""
    first = states[0]
    for s in states[1:]:
        if s["phase"] != first["phase"] or s["dataset"] != first["dataset"]:
            raise CursorError(
                "ranks disagree on the stream's phase; were they started from one cursor?"
            )
        if s.get("inherited") != first.get("inherited"):
            raise CursorError(
                "ranks resumed from different cursors (their inherited tallies differ)"
            )
    consumed: dict[str, int] = {}
    for s in states:
        for j, n in s["consumed"].items():
            if j in consumed:
                raise CursorError(f"reader {j} is reported by two ranks")
            consumed[j] = n
    total = Tally.from_dict(first["inherited"]) if "inherited" in first else Tally()
    for s in states:
        total = total + Tally.from_dict(s)
    merged = {k: v for k, v in first.items() if k not in ("inherited", *TALLY)}
    return merged | {"consumed": consumed} | total.to_dict()
