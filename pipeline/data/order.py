"""Stages 1-3 of the stream (see pipeline.data.stream): the global sample order of an epoch,
its split into readers, and each reader's shuffled plan. Pure functions of (seed, epoch,
layout): no I/O, the same on every rank and worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def ranges_slice(ranges: np.ndarray, a: int, b: int) -> np.ndarray:
    """Positions [a, b) of the concatenation of half-open ranges (n, 2)."""
    lengths = ranges[:, 1] - ranges[:, 0]
    ends = np.cumsum(lengths)
    out = []
    first = int(np.searchsorted(ends, a, side="right"))
    pos = a
    for i in range(first, len(ranges)):
        if pos >= b:
            break
        start_in = pos - (ends[i] - lengths[i])
        take = min(b - pos, lengths[i] - start_in)
        out.append(np.arange(ranges[i, 0] + start_in, ranges[i, 0] + start_in + take))
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def compress(positions: np.ndarray) -> np.ndarray:
    """Sorted unique positions -> half-open ranges (n, 2)."""
    if len(positions) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.nonzero(np.diff(positions) != 1)[0]
    starts = np.concatenate([[positions[0]], positions[breaks + 1]])
    ends = np.concatenate([positions[breaks] + 1, [positions[-1] + 1]])
    return np.stack([starts, ends], axis=1).astype(np.int64)


@dataclass
class Phase:
    """A pass over some positions of one epoch by `readers` readers.

    generation 0 is a whole epoch; generation g > 0 is what was left of it when a run resumed
    with a different layout, dealt out to the new readers (no tail dropped).
    """

    epoch: int
    readers: int
    batch: int
    work: np.ndarray  # (n, 2) ranges of global positions, in order
    generation: int = 0
    drop_last: bool = True
    shuffle: bool = True
    lanes: int = 4
    window: int = 1024

    @property
    def total(self) -> int:
        return int((self.work[:, 1] - self.work[:, 0]).sum())

    @property
    def used(self) -> int:
        """Positions served: all of them, or a multiple of readers x batch when dropping the tail."""
        if self.drop_last and self.generation == 0:
            return self.total // (self.readers * self.batch) * self.readers * self.batch
        return self.total

    def chunk(self, j: int) -> tuple[int, int]:
        return j * self.used // self.readers, (j + 1) * self.used // self.readers

    @property
    def batches_per_reader(self) -> int:
        longest = max(b - a for a, b in (self.chunk(j) for j in range(self.readers)))
        return math.ceil(longest / self.batch)

    def plan(self, j: int, seed: int) -> np.ndarray:
        """Reader j's positions in the order it delivers them."""
        a, b = self.chunk(j)
        positions = ranges_slice(self.work, a, b)
        if not self.shuffle or len(positions) == 0:
            return positions
        lanes = np.array_split(positions, min(self.lanes, len(positions)))
        step = np.concatenate([np.arange(len(lane)) for lane in lanes])
        lane_id = np.concatenate([np.full(len(lane), k) for k, lane in enumerate(lanes)])
        merged = np.concatenate(lanes)[np.lexsort((lane_id, step))]
        for w in range(0, len(merged), self.window):
            rng = np.random.default_rng([seed, self.epoch, self.generation, j, w])
            merged[w : w + self.window] = rng.permutation(merged[w : w + self.window])
        return merged

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["work"] = self.work.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phase:
        d = dict(d)
        d["work"] = np.asarray(d["work"], dtype=np.int64).reshape(-1, 2)
        return cls(**d)


def shard_order(
    counts: np.ndarray, seed: int, epoch: int, shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(shard permutation, cumulative sample counts in that order) of one epoch."""
    perm = (
        np.random.default_rng([seed, epoch, 7919]).permutation(len(counts))
        if shuffle
        else np.arange(len(counts))
    )
    return perm, np.cumsum(counts[perm])


def locate(
    positions: np.ndarray, perm: np.ndarray, cum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Global positions -> (shard index in the manifest, sample index in the shard)."""
    slot = np.searchsorted(cum, positions, side="right")
    before = np.where(slot > 0, cum[np.maximum(slot - 1, 0)], 0)
    return perm[slot], positions - before
