"""The training input: shards -> batches on every rank, resumable exactly once mid-epoch.

What happens to a sample, top to bottom:

  1. order      One global order per (seed, epoch): shards in a seeded permutation, their samples
                concatenated: global positions 0..N-1. It does not depend on ranks or workers.
  2. split      R = ranks x workers readers; reader j takes the j-th contiguous chunk of the
                positions (training drops the last N mod (R x batch) of them, chosen anew each
                epoch by the permutation, so every reader has the same number of batches).
  3. shuffle    A reader splits its chunk into `shuffle_shards` lanes read side by side,
                interleaves them, and permutes each window of `shuffle_buffer` positions
                (seeded): the buffer holds one window, a batch mixes several shards.
  4. read       Positions -> (shard, sample) -> byte ranges from the shard's .idx; runs of
                samples come in one ranged read through fsspec, retried on transient errors.
  5. decode     PIL decode, labels from .cls / .json; unreadable samples are quarantined
                (counted, key and reason recorded), never retried, never slept on.
  6. transform  ViT augmentation (random resized crop, flip) to uint8 pixels, or palette tokens;
                a JPEG is decoded only as far as its crop needs; `model_input` turns pixels
                into floats in [-1, 1] on the accelerator.
  7. batch      Every `batch` consecutive positions of a reader make one batch, minus the
                quarantined ones; every rank yields the same number of batches per epoch.
                Samples are resized straight into the batch: images (B, C, H, W) uint8,
                channels last in memory. DataLoader workers fill shared-memory slots they
                reuse (_BatchSlots) and go on from epoch to epoch.

Resume: a batch carries (reader, index). The stream's state is the phase (epoch, which
positions, how many readers) and how many batches each reader has delivered: restoring with
the same layout continues every reader where it stopped, in the same order; with another
layout the undelivered positions of the epoch are dealt out afresh to the new readers: none
missing, none twice.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import RunConfig
from pipeline.data.cursor import STATE_FORMAT, Cursor, Tally, merge_states, rank_state
from pipeline.data.order import Phase, compress, locate, shard_order
from pipeline.data.palette import Palette
from pipeline.data.shards import (
    IMAGE_EXTS,
    DatasetError,
    Manifest,
    check_shards,
    load_manifest,
    read_index,
    read_samples,
)
from pipeline.data.transforms import SMALL, ImageTransform, empty
from pipeline.errors import StorageUnavailable
from pipeline.storage import filesystem, join, with_retries

RUN_GAP = 8  # coalesce reads of two runs in one shard when fewer samples than this lie between
INDEXES = 64  # shard indexes a reader keeps (8 bytes a sample), from epoch to epoch


class DataError(RuntimeError):
    """The data went bad beyond the error budget; names the worst shards."""


@dataclass(frozen=True)
class StreamConfig:
    url: str  # dataset URL (holds dataset.json)
    split: str = "train"
    batch_size: int = 32  # per rank per step
    train: bool = True  # shuffle + augment + drop the ragged tail; False: every sample, in order
    seed: int = 0
    image_size: int = 0  # output side; 0: the dataset's
    channels: int = 0  # 1 or 3; 0: the dataset's
    augment: bool = True  # random resized crop + flip (train only)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    randaugment_ops: int = 0  # with augment: RandAugment, random erasing (augment.py)
    randaugment_magnitude: float = 9.0
    random_erasing: float = 0.0
    palette: Palette | None = None  # set: batches hold "tokens" instead of "image"
    labels: bool = True  # a sample without a label is quarantined
    shuffle_shards: int = 4
    shuffle_buffer: int = 1024
    workers: int = 0  # DataLoader worker processes per rank
    max_error_rate: float = 0.01
    endpoint_url: str = ""
    storage_deadline_s: float | None = None  # None: a few retries, then the sample is quarantined
    limit: int = 0  # read only the split's first `limit` samples, in its stored order (0: all)


def over_budget(errors: int, seen: int, rate: float, final: bool = False) -> bool:
    """Whether more than `rate` of the `seen` samples of an epoch were unreadable, once enough
    were seen to tell (or at the epoch's end)."""
    enough = seen >= max(100, math.ceil(10 / rate)) if rate > 0 else True
    return bool(errors) and (enough or final) and errors > rate * seen


def budget_error(
    where: str, errors: int, seen: int, rate: float, quarantine: list[dict[str, Any]]
) -> DataError:
    """The error of an epoch over its budget, naming the worst shards of `quarantine` (the
    epoch's entries: key, shard, reason) and the latest."""
    worst = Counter(e["shard"] for e in quarantine).most_common(5)
    latest = quarantine[-1]
    return DataError(
        f"{where}: {errors} of {seen} samples unreadable this epoch "
        f"({100 * errors / seen:.1f}%), over the {100 * rate:g}% budget; worst shards: "
        f"{', '.join(f'{s} ({n})' for s, n in worst)}; latest: {latest['key']}: "
        f"{latest['reason']}"
    )


def resolve_palette(
    spec: str, size: int, manifest: Manifest, channels: int, endpoint_url: str = ""
) -> Palette:
    """A data.palette setting -> Palette: "kmeans" (fitted by prepare), "uniform" (3 bits per
    channel), "grey" (`size` levels), or the URL of a palette file."""
    if spec == "kmeans":
        if not manifest.palette:
            raise DatasetError(
                f"{manifest.url}: has no fitted palette; run `tessera prepare ... --palette 512` "
                "or set data.palette to uniform, grey or a palette URL"
            )
        return Palette.load(join(manifest.url, manifest.palette), endpoint_url)
    if spec == "uniform":
        return Palette.uniform(bits=3, channels=channels)
    if spec == "grey":
        return Palette.grey(size)
    return Palette.load(spec, endpoint_url)


def stream_config(run: RunConfig, split: str, batch_size: int, train: bool) -> StreamConfig:
    """The stream a run reads: its data section, the model's image size, channels and (for
    ImageGPT) palette, labels when the objective needs them."""
    data, model = run.data, run.model
    palette, channels = None, getattr(model, "channels", 0)
    if model.family == "igpt":
        manifest = load_manifest(data.url, data.endpoint_url)
        channels = manifest.channels
        palette = resolve_palette(
            data.palette, data.palette_size, manifest, channels, data.endpoint_url
        )
        if palette.size != model.vocab_size:
            raise DatasetError(
                f"data.palette {data.palette!r} has {palette.size} colours but model.vocab_size is "
                f"{model.vocab_size}; they must agree"
            )
    return StreamConfig(
        data.url, split, batch_size, train, run.train.seed, model.image_size, channels,
        augment=data.augment == "vit", crop_scale=data.crop_scale, palette=palette,
        randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
        random_erasing=data.random_erasing,
        labels=not run.train.objective.startswith("igpt"), shuffle_shards=data.shuffle_shards,
        shuffle_buffer=data.shuffle_buffer, workers=data.workers,
        max_error_rate=data.max_error_rate, endpoint_url=data.endpoint_url,
        storage_deadline_s=data.storage_deadline_s,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1-3: the order (pipeline.data.order)


def epoch_phase(cfg: StreamConfig, samples: int, readers: int, epoch: int) -> Phase:
    """A whole epoch of a split of `samples` samples (its first cfg.limit), read by `readers`
    readers."""
    if cfg.limit:
        samples = min(samples, cfg.limit)
    return Phase(
        epoch, readers, cfg.batch_size, np.array([[0, samples]], dtype=np.int64),
        drop_last=cfg.train, shuffle=cfg.train, lanes=cfg.shuffle_shards, window=cfg.shuffle_buffer,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4-7: a reader, in a DataLoader worker (or the main process)


class _Reader:
    def __init__(self, cfg: StreamConfig, manifest: Manifest, transform: ImageTransform) -> None:
        self.cfg, self.manifest, self.transform = cfg, manifest, transform
        self.shards = manifest.split(cfg.split).shards
        self.fs, self.root = filesystem(manifest.url, cfg.endpoint_url)
        self.index: OrderedDict[int, np.ndarray] = OrderedDict()  # the INDEXES used last
        self.retries = 0
        self.num_classes = len(manifest.classes)
        size = manifest.image_size
        self.raw_shape = (*size, manifest.channels) if size else None  # of raw pixel samples

    def _count_retry(self, _: BaseException) -> None:
        self.retries += 1

    def _offsets(self, shard: int) -> np.ndarray:
        if shard in self.index:
            self.index.move_to_end(shard)
        else:
            path = join(self.root, self.shards[shard].index)
            self.index[shard] = with_retries(
                f"reading {path}",
                lambda: read_index(self.fs, path),
                on_retry=self._count_retry,
                deadline_s=self.cfg.storage_deadline_s,
            )
            if len(self.index) > INDEXES:
                self.index.popitem(last=False)
        return self.index[shard]

    def fetch(self, shards: np.ndarray, members: np.ndarray) -> dict[tuple[int, int], tuple]:
        """(shard, member) pairs -> {(shard, member): (key, sample, reason)}, reading each run
        of nearby samples in one ranged request."""
        out: dict[tuple[int, int], tuple] = {}
        for shard in np.unique(shards):
            wanted = np.unique(members[shards == shard])
            name = self.shards[shard].name
            breaks = np.nonzero(np.diff(wanted) > RUN_GAP)[0]
            for run in np.split(wanted, breaks + 1):
                first, last = int(run[0]), int(run[-1])
                try:
                    offsets = self._offsets(int(shard))
                    got = read_samples(
                        self.fs,
                        join(self.root, name),
                        offsets,
                        first,
                        last,
                        on_retry=self._count_retry,
                        deadline_s=self.cfg.storage_deadline_s,
                    )
                    for i, key, sample, reason in got:
                        out[(int(shard), i)] = (key, sample, reason)
                except StorageUnavailable:
                    raise  # the store is down, not the data bad: nothing is quarantined
                except Exception as e:  # the shard cannot be read at all
                    for i in run:
                        out[(int(shard), int(i))] = (None, None, f"shard unreadable: {e}")
        return out

    def labels(self, sample: dict[str, bytes]) -> list[int] | None:
        if "cls" in sample:
            return [int(sample["cls"].decode().strip())]
        if "json" in sample:
            labels = json.loads(sample["json"]).get("labels")
            return [int(x) for x in labels] if isinstance(labels, list) else None
        return None

    def image(self, sample: dict[str, bytes]) -> tuple[bytes | np.ndarray, list[int]]:
        """(the encoded image, or raw pixels (h, w, C) uint8; its labels), checked."""
        if "raw" in sample:
            image = np.frombuffer(sample["raw"], np.uint8)
            if self.raw_shape is None or image.size != math.prod(self.raw_shape):
                raise ValueError(
                    f"raw pixels: {image.size} bytes, but the manifest's image_size and channels "
                    f"make {math.prod(self.raw_shape or (0,))}"
                )
            image = image.reshape(self.raw_shape)
        else:
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            raise ValueError(f"no image member (has: {', '.join(sample) or 'nothing'})")
        labels = self.labels(sample) if self.cfg.labels else []
        if self.cfg.labels:
            if not labels:
                raise ValueError("no label (.cls or .json)")
            if self.num_classes and not all(0 <= lab < self.num_classes for lab in labels):
                raise ValueError(f"label {labels} outside the {self.num_classes} classes")
        return image, labels

    def decode(
        self, key: str, sample: dict[str, bytes], rng: random.Random
    ) -> tuple[np.ndarray, list[int]]:
        """(the sample in a new array (ImageTransform.__call__), its labels)."""
        image, labels = self.image(sample)
        return self.transform(image, rng), labels


def _as_made(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _outlive_sigterm(_: int) -> None:
    """In a DataLoader worker: ignore SIGTERM, and die with the rank.

    Preemption (SLURM, the deepspeed launcher) signals the whole process tree; a worker that
    died of it would make its rank fail ("DataLoader worker ... is killed by signal") instead of
    saving a checkpoint. So the worker lives on until its rank ends it: the DataLoader shuts it
    down, `_kill_workers_at_exit` kills it, or, when the rank dies of something else (SIGKILL,
    `ray stop`), Linux sends it SIGKILL (PR_SET_PDEATHSIG) instead of leaving an orphan that
    holds its shared memory and may spin waiting for a slot."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        rank = multiprocessing.parent_process()
        if rank is not None and os.getppid() != rank.pid:  # it died before the line above
            os._exit(0)


@atexit.register
def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing stops daemonic children (the DataLoader's workers)
    with SIGTERM and then waits for them; ours ignore SIGTERM (`_outlive_sigterm`), so a rank
    that left by an exception, with its loader still open, waited forever. Registered after
    multiprocessing's own exit handler, this runs before it and ends them with SIGKILL."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class _BatchSlots:
    """Shared-memory batch buffers, made once by the main process, that worker processes fill.

    By default a DataLoader worker's batch reaches the main process in fresh shared memory, sent
    as a file descriptor: for 64 x 3 x 224 x 224 bytes that is ~2,400 page faults in the worker
    (about 9 ms in a profile, the time to decode 20 of its images), and workers faulting at once
    slow each other down in the kernel. Here worker w decodes its batch straight into one of its
    SLOTS buffers and sends only the slot's number; the main process copies the batch out
    (~1 ms, profiled) and marks the slot free in `busy`. A worker finding all its slots busy waits.
    """

    SLOTS = 3  # the DataLoader's prefetch (2 per worker) and one being filled

    def __init__(self, workers: int, batch: int, layout: tuple[tuple[int, ...], torch.dtype]):
        shape, dtype = layout
        self.busy = torch.zeros(workers, self.SLOTS, dtype=torch.int8).share_memory_()
        self.buffers = torch.empty((workers, self.SLOTS, batch, *shape), dtype=dtype)
        self.buffers.share_memory_()

    def acquire(self, worker: int) -> tuple[int, torch.Tensor]:
        """In worker `worker`: (a free slot of its own, now taken; its buffer). A worker whose
        rank is gone (its slots are never freed again) exits instead of waiting forever."""
        parent = os.getppid()
        while not (free := torch.nonzero(self.busy[worker] == 0)).numel():
            time.sleep(0.0005)
            if os.getppid() != parent:
                os._exit(0)
        k = int(free[0])
        self.busy[worker, k] = 1
        return k, self.buffers[worker, k]

    def take(self, worker: int, k: int, n: int) -> torch.Tensor:
        """In the main process: a copy of the first n samples in slot k, which is then free."""
        out = empty((n, *self.buffers.shape[3:]), self.buffers.dtype)
        out.copy_(self.buffers[worker, k, :n])
        self.busy[worker, k] = 0
        return out


@dataclass(frozen=True)
class _Ahead:
    at: tuple[int, int]  # (epoch, batch): the batch that will want this read
    read: Future  # -> Reader.fetch's result


class _Plan:
    """Reader j's positions in one phase, and where they lie in the shards."""

    def __init__(self, cfg: StreamConfig, reader: _Reader, phase: Phase, j: int) -> None:
        counts = np.array([s.samples for s in reader.shards])
        self.perm, self.cum = shard_order(counts, cfg.seed, phase.epoch, phase.shuffle)
        self.positions = phase.plan(j, cfg.seed)
        self.phase = phase

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return locate(positions, self.perm, self.cum)

    def span(self, b: int) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """What is read when batch b finds its samples missing: the rest of its shuffle window
        (at least the batch), as (shards, members); first, the batch that will find its samples
        missing next."""
        batch, window = self.phase.batch, self.phase.window
        lo = b * batch
        hi = max(min(len(self.positions), (lo // window + 1) * window), lo + batch)
        return hi // batch, self.locate(self.positions[lo:hi])


class _ReaderDataset(IterableDataset):
    """Worker i reads for reader `readers[i]`, starting at batch `starts[i]`; `onward`: then on
    through the following whole epochs, as the same reader."""

    def __init__(
        self, cfg: StreamConfig, manifest: Manifest, transform: ImageTransform, phase: Phase,
        readers: list[int], starts: list[int], slots: _BatchSlots | None = None,
        onward: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.manifest, self.transform = cfg, manifest, transform
        self.phase, self.readers, self.starts, self.slots = phase, readers, starts, slots
        self.onward = onward

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        if info is None and len(self.readers) > 1:
            raise RuntimeError("several readers need DataLoader workers")
        j, phase, start = self.readers[slot], self.phase, self.starts[slot]
        reader = _Reader(self.cfg, self.manifest, self.transform)
        samples = self.manifest.split(self.cfg.split).samples
        # The next span is read in a thread while this one decodes, across epochs: from object
        # storage a read waits tens of milliseconds that the worker would otherwise spend idle.
        pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-read-ahead")
        ahead = None
        try:
            while True:
                following = None
                if self.onward:
                    following = epoch_phase(self.cfg, samples, phase.readers, phase.epoch + 1)
                ahead = yield from self._batches(reader, pool, ahead, j, phase, start, following)
                if following is None:
                    return
                phase, start = following, 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _batches(
        self, reader: _Reader, pool: ThreadPoolExecutor, ahead: _Ahead | None, j: int,
        phase: Phase, start: int, following: Phase | None,
    ) -> Generator[dict[str, Any], None, _Ahead | None]:  # fmt: skip
        """Reader j's batches of `phase` from batch `start` on, reading ahead (`ahead`: the read
        begun for batch `start`, if any); returns the read begun for `following`'s first batch."""
        plan = _Plan(self.cfg, reader, phase, j)
        fetched: dict[tuple[int, int], tuple] = {}
        for b in range(start, phase.batches_per_reader):
            positions = plan.positions[b * phase.batch : (b + 1) * phase.batch]
            shards, members = plan.locate(positions)
            if any((int(s), int(m)) not in fetched for s, m in zip(shards, members, strict=True)):
                after, wanted = plan.span(b)
                if ahead and ahead.at == (phase.epoch, b):
                    fetched = ahead.read.result()
                else:
                    if ahead:  # never two reads at once (not expected: the plan is exact)
                        ahead.read.exception()
                    fetched = reader.fetch(*wanted)
                ahead = None
                if after < phase.batches_per_reader:
                    ahead = _Ahead(
                        (phase.epoch, after), pool.submit(reader.fetch, *plan.span(after)[1])
                    )
                elif following is not None:
                    then = _Plan(self.cfg, reader, following, j).span(0)[1]
                    ahead = _Ahead((following.epoch, 0), pool.submit(reader.fetch, *then))
            yield self._decode(reader, phase, j, b, positions, shards, members, fetched)
        return ahead

    def _decode(
        self, reader: _Reader, phase: Phase, j: int, b: int, positions: np.ndarray,
        shards: np.ndarray, members: np.ndarray, fetched: dict[tuple[int, int], tuple],
    ) -> dict[str, Any]:  # fmt: skip
        """Batch b of reader j from the samples in `fetched` (taken out of it)."""
        cfg = self.cfg
        slot, memory = self._buffer(len(positions))
        out = self.transform.batch(memory)  # each good sample is decoded into the next row
        labels, keys, errors, index = [], [], [], []
        raw: list[tuple[int, np.ndarray, random.Random]] = []  # resized together, below
        for g, s, m in zip(positions, shards, members, strict=True):
            key, sample, reason = fetched.pop((int(s), int(m)))
            if sample is not None:
                rng = random.Random(((cfg.seed * 1_000_003 + phase.epoch) << 40) + int(g))
                try:
                    image, lab = reader.image(sample)
                    if not isinstance(image, np.ndarray):  # a small image comes decoded
                        pixels = self.transform.small(image)
                        image = image if pixels is None else pixels
                    if not isinstance(image, np.ndarray):
                        self.transform.crop_into(image, rng, out[len(keys)])
                    elif image.shape[0] * image.shape[1] <= SMALL:
                        raw.append((len(keys), image, rng))
                    else:  # large raw pixels: cropped where they lie, not stacked with others
                        self.transform.raw_into(image[None], [rng], out[len(keys)][None])
                    labels.append(lab)
                    keys.append(key)
                    index.append(int(g))
                    continue
                except Exception as e:
                    reason = f"undecodable: {e}"
            name = reader.shards[s].name
            errors.append({"key": key or f"{name}#{m}", "shard": name, "reason": reason})
        self._resize_together(raw, out, memory)
        batch = self._labelled({"key": keys}, labels)
        if not cfg.train:  # in order, unshuffled: a sample's position is its place in the split
            batch["index"] = np.array(index, dtype=np.int64)
        if slot is None:
            batch["tokens" if cfg.palette is not None else "image"] = out[: len(keys)]
        else:  # the main process takes the samples from the slot (Stream._run_phase)
            batch["_worker"], batch["_slot"] = slot
        retries, reader.retries = reader.retries, 0
        return batch | {
            "_epoch": phase.epoch, "_reader": j, "_batch": b, "_errors": errors,
            "_retries": retries,
        }  # fmt: skip

    def _resize_together(
        self, raw: list[tuple[int, np.ndarray, random.Random]], out: torch.Tensor,
        memory: torch.Tensor,
    ) -> None:  # fmt: skip
        """Pixels (row, (h, w, C), rng) -> their rows of the batch, one `raw_into` per size."""
        by_size: dict[tuple[int, ...], list] = {}
        for item in raw:
            by_size.setdefault(item[1].shape, []).append(item)
        for group in by_size.values():
            rows, images, rngs = zip(*group, strict=True)
            if rows == tuple(range(len(rows))):  # all of the batch so far: straight into it
                self.transform.raw_into(np.stack(images), list(rngs), out[: len(rows)])
            else:
                made = self.transform.batch(empty((len(rows), *memory.shape[1:]), memory.dtype))
                out[list(rows)] = self.transform.raw_into(np.stack(images), list(rngs), made)

    def _buffer(self, n: int) -> tuple[tuple[int, int] | None, torch.Tensor]:
        """(worker and slot, or None in the main process; memory for n samples)."""
        info = get_worker_info()
        if info is not None and self.slots is not None:
            k, memory = self.slots.acquire(info.id)
            return (info.id, k), memory[:n]
        shape, dtype = self.transform.layout
        return None, empty((n, *shape), dtype)

    def _labelled(self, batch: dict[str, Any], labels: list[list[int]]) -> dict[str, Any]:
        """Labels as numpy arrays: from a worker process they travel pickled, where a tensor
        would travel as shared memory and a file descriptor (~1 ms a batch, profiled)."""
        if self.cfg.labels and self.manifest.multi_label:
            batch["label"] = np.zeros((len(labels), len(self.manifest.classes)), np.float32)
            for i, lab in enumerate(labels):
                batch["label"][i, lab] = 1.0
        elif self.cfg.labels:
            batch["label"] = np.array([lab[0] for lab in labels], dtype=np.int64)
        return batch


def make_transform(cfg: StreamConfig, manifest: Manifest) -> ImageTransform:
    """Bytes -> model input for this stream: its side, channels, augmentation and palette."""
    channels = cfg.channels or manifest.channels
    size = cfg.image_size or (manifest.image_size[0] if manifest.image_size else 0)
    if not size:
        raise DatasetError(f"{cfg.url}: images vary in size; set an image_size for the stream")
    if cfg.palette is not None and cfg.palette.channels != channels:
        raise DatasetError(
            f"the palette has {cfg.palette.channels} channels but the stream makes {channels}-channel images"
        )
    return ImageTransform(
        size, channels, cfg.train and cfg.augment, cfg.crop_scale, palette=cfg.palette,
        randaugment_ops=cfg.randaugment_ops, randaugment_magnitude=cfg.randaugment_magnitude,
        erasing=cfg.random_erasing,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The stream and its cursor


def dataset_fingerprint(manifest: Manifest, split: str) -> str:
    h = hashlib.sha256()
    for s in manifest.split(split).shards:
        h.update(f"{s.name}:{s.samples};".encode())
    return h.hexdigest()[:16]


class Stream:
    """Batches for one rank. Iterating goes on epoch after epoch; `state_dict()` at any point
    (between batches) is a cursor that `load_state_dict` restores exactly.

    rank/world default to torch.distributed's when it is initialised, else 0/1.
    """

    def __init__(
        self, cfg: StreamConfig, rank: int | None = None, world: int | None = None
    ) -> None:
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.manifest = load_manifest(cfg.url, cfg.endpoint_url)
        self.split = self.manifest.split(cfg.split)
        self.warnings = check_shards(self.manifest, cfg.split, cfg.endpoint_url)
        if self.split.samples == 0:
            raise DatasetError(f"{cfg.url}: split {cfg.split!r} has no samples")
        self.transform = make_transform(cfg, self.manifest)
        self.fingerprint = dataset_fingerprint(self.manifest, cfg.split)
        self.cursor = Cursor(self._epoch_phase(0))
        self._batch_slots: _BatchSlots | None = None
        if self.cursor.phase.used == 0:  # a training stream drops the tail: nothing would come
            n = self.cursor.phase.total
            raise DatasetError(
                f"{cfg.url}: split {cfg.split!r} has {n} samples{' (data.limit)' * bool(cfg.limit)}, "
                f"fewer than one batch of {cfg.batch_size} for each of its {self.readers} readers "
                f"(ranks x data.workers, at least one a rank); training would wait for a first "
                "batch forever. Use a smaller batch, fewer ranks or workers, or more data"
            )

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.cfg.workers)

    @property
    def readers(self) -> int:
        return self.world * self.workers_per_rank

    def _epoch_phase(self, epoch: int) -> Phase:
        return epoch_phase(self.cfg, self.split.samples, self.readers, epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        return self._epoch_phase(0).batches_per_reader * self.workers_per_rank

    @property
    def epoch(self) -> int:
        return self.cursor.phase.epoch

    # -- iteration -------------------------------------------------------------------------

    def _local_readers(self) -> list[int]:
        w = self.workers_per_rank
        return [self.rank * w + k for k in range(w)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._run_phase(onward=True)
            self._next_epoch()

    def iter_epoch(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch only (e.g. one pass for feature extraction)."""
        yield from self._run_phase(onward=False)
        self._check_budget(final=True)

    def _next_epoch(self) -> None:
        self._check_budget(final=True)
        self.cursor = self.cursor.next_epoch(self._epoch_phase(self.cursor.phase.epoch + 1))

    def _run_phase(self, onward: bool) -> Iterator[dict[str, Any]]:
        """The cursor's phase; `onward`: and the epochs after it with the same workers, instead
        of starting new ones each epoch (a fork and a first batch to wait for).

        Going on keeps the order: every reader has as many batches in a phase, so the workers
        whose readers are one batch ahead (a resume mid-round) run out first, and the
        round-robin reaches them, with the next epoch's first readers, in the order a new
        epoch starts with."""
        c = self.cursor
        local = self._local_readers()
        done = [c.consumed.get(j, 0) for j in local]
        # Resume the round-robin where it stopped: the DataLoader always starts at worker 0, so
        # worker i takes the reader that was due i-th.
        offset = sum(done) % len(local)
        order = [(k + offset) % len(local) for k in range(len(local))]
        readers = [local[k] for k in order]
        starts = [done[k] for k in order]
        if all(s >= c.phase.batches_per_reader for s in starts):
            return
        slots = self._slots(c.phase.batch) if self.cfg.workers else None
        if slots is not None:
            slots.busy.zero_()  # a phase left early left its slots taken; its workers are gone
        dataset = _ReaderDataset(
            self.cfg, self.manifest, self.transform, c.phase, readers, starts, slots, onward
        )
        # The batches are made by the dataset; collate_fn keeps the DataLoader from converting
        # their numpy arrays to tensors in the worker (see _ReaderDataset._labelled).
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.workers, collate_fn=_as_made,
            worker_init_fn=_outlive_sigterm,
        )  # fmt: skip
        for batch in loader:
            if batch.pop("_epoch") != c.phase.epoch:  # the workers went on to the next epoch
                self._next_epoch()
                c = self.cursor
            if "_slot" in batch:
                name = "image" if self.cfg.palette is None else "tokens"
                memory = slots.take(batch.pop("_worker"), batch.pop("_slot"), len(batch["key"]))
                batch[name] = self.transform.batch(memory)
            for name in ("label", "index"):
                if name in batch:
                    batch[name] = torch.from_numpy(batch[name])
            c.consumed[batch.pop("_reader")] = batch.pop("_batch") + 1
            c.count(len(batch["key"]), batch.pop("_errors"), batch.pop("_retries"))
            self._check_budget()
            yield batch

    def _slots(self, batch: int) -> _BatchSlots:
        """The workers' batch buffers, made once: a phase's workers have ended before the next
        phase's start."""
        if self._batch_slots is None or self._batch_slots.buffers.shape[2] != batch:
            self._batch_slots = _BatchSlots(self.cfg.workers, batch, self.transform.layout)
        return self._batch_slots

    def _check_budget(self, final: bool = False) -> None:
        c, rate = self.cursor, self.cfg.max_error_rate
        if over_budget(c.errors, c.seen, rate, final):
            this_epoch = [e for e in c.quarantine if e["epoch"] == c.phase.epoch]
            where = f"{self.cfg.url} ({self.cfg.split})"
            raise budget_error(where, c.errors, c.seen, rate, this_epoch)

    # -- state -----------------------------------------------------------------------------

    def mark(self) -> Cursor:
        """The cursor as it is now, to go back to with `rewind` when the batches drawn since
        cannot be trained on (another rank's store went down in the middle of a step)."""
        return replace(self.cursor, consumed=dict(self.cursor.consumed))

    def rewind(self, mark: Cursor) -> None:
        """The cursor of `mark`: the batches drawn since count as never delivered, for a
        checkpoint taken before the process stops (the readers themselves are not rewound)."""
        self.cursor = mark

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor (JSON-serialisable): its own readers' positions and what it
        counted. `merge_states` makes one cursor of every rank's."""
        return rank_state(self.cursor, self._local_readers(), self.fingerprint, self.cfg.seed)

    merge_states = staticmethod(merge_states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a cursor (merged, or a single rank's of a one-rank run): exactly where
        each reader stopped if the layout (ranks x workers, batch size, shuffle settings) is the
        same, else the undelivered positions of the epoch dealt out afresh to this layout's
        readers. Its tally becomes this rank's inherited tally."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"not a stream cursor (format {state.get('format')!r})")
        if state["dataset"] != self.fingerprint or state["seed"] != self.cfg.seed:
            raise DataError(
                f"the cursor is for another dataset or seed (dataset {state['dataset']}, seed "
                f"{state['seed']}); this stream reads {self.fingerprint} with seed {self.cfg.seed}"
            )
        if "inherited" in state:
            state = merge_states([state])
        phase = Phase.from_dict(state["phase"])
        consumed = {int(j): n for j, n in state["consumed"].items()}
        tally = Tally.from_dict(state)
        same = (
            phase.readers == self.readers
            and phase.batch == self.cfg.batch_size
            and (phase.lanes, phase.window) == (self.cfg.shuffle_shards, self.cfg.shuffle_buffer)
        )
        if all(consumed.get(j, 0) >= phase.batches_per_reader for j in range(phase.readers)):
            self.cursor = Cursor(self._epoch_phase(phase.epoch + 1), inherited=tally.next_epoch())
        elif same:
            self.cursor = Cursor(phase, consumed, inherited=tally)
        else:
            left = [
                phase.plan(j, self.cfg.seed)[consumed.get(j, 0) * phase.batch :]
                for j in range(phase.readers)
            ]
            rest = np.sort(np.concatenate(left))
            self.cursor = Cursor(
                Phase(
                    phase.epoch,
                    self.readers,
                    self.cfg.batch_size,
                    compress(rest),
                    generation=phase.generation + 1,
                    drop_last=False,
                    shuffle=phase.shuffle,
                    lanes=self.cfg.shuffle_shards,
                    window=self.cfg.shuffle_buffer,
                ),
                inherited=tally,
            )
