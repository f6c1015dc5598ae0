"""`tessera prepare`: a source -> WebDataset shards + manifest at any fsspec URL.

The plan (which record goes to which shard) is a pure function of the source listing and the
seed, so output is byte-for-byte reproducible and an interrupted run can resume:
  1. `.prepare/plan.json` records the plan; a re-run with another plan is refused.
  2. Each shard is a task (Ray, or in-process): tar under a temporary name then renamed, then
     its `.idx`, then `.prepare/parts/NAME.json`, which marks the shard done.
  3. When every shard is done: the palette (if asked), then `dataset.json`, written last. Until
     then the URL holds no manifest, so nothing mistakes it for a complete dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.data.palette import fit_palette, sample_pixels
from pipeline.data.shards import (
    BLOCK,
    MANIFEST,
    DatasetError,
    Manifest,
    ShardInfo,
    SplitInfo,
    index_bytes,
    label_members,
    load_manifest,
    scan_tar,
    sha256,
    write_tar,
)
from pipeline.data.sources import Record, Source, SourceError
from pipeline.orchestrate.ray_tasks import Executor, parallel_map
from pipeline.storage import filesystem, join, write_atomic

WORK = ".prepare"
PALETTE_FILE = "palette.json"


@dataclass(frozen=True)
class PrepareOptions:
    seed: int = 0
    shard_bytes: int = 64 << 20  # target tar size; samples per shard is estimated from it
    samples_per_shard: int = 0  # overrides shard_bytes when > 0
    val_fraction: float = 0.0  # carve a "val" split out of "train" (when the source has none)
    palette_size: int = 0  # fit a k-means palette of this many colours on "train" (0: none)
    pixels: str = "encoded"  # "raw": decoded uint8 pixels (KEY.raw), for small images of one size
    executor: Executor = "ray"
    ray_address: str = ""
    endpoint_url: str = ""
    progress: bool = True


@dataclass(frozen=True)
class ShardTask:
    split: str
    name: str
    records: tuple[Record, ...]


def parse_size(text: str) -> int:
    """ "64MB" / "512KiB" / "1e6" -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
    }
    t = text.strip().lower()
    num = t.rstrip("abgikm")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r}; e.g. 64MB, 512KiB, 1000000")
    return int(float(num) * units[unit])


def plan_splits(source: Source, opts: PrepareOptions) -> dict[str, list[Record]]:
    """Each split's records in a seeded order (so shards are random samples of the data)."""
    splits = {}
    for name, records in source.splits.items():
        rng = np.random.default_rng([opts.seed, zlib.crc32(name.encode())])
        splits[name] = [records[i] for i in rng.permutation(len(records))]
    if opts.val_fraction > 0:
        if "val" in splits:
            raise SourceError(f"{source.url}: already has a 'val' split; drop --val-fraction")
        splits["val"], splits["train"] = carve_val(splits["train"], opts.val_fraction, source)
    return splits


def val_record(source: Source, splits: dict[str, list[Record]], opts: PrepareOptions) -> dict:
    """How the val split was made, for dataset.json (results name the split they selected on)."""
    if not opts.val_fraction:
        return {}
    how = "by first label" if source.multi_label else "by class"
    if not any(r.labels for r in splits["val"]):
        how = "no (unlabelled)"
    return {"val": {"carved_from": "train", "fraction": opts.val_fraction, "seed": opts.seed,
                    "stratified": how, "samples": len(splits["val"])}}  # fmt: skip


def carve_val(
    train: list[Record], fraction: float, source: Source
) -> tuple[list[Record], list[Record]]:
    """(val, train): `fraction` of the (seeded, shuffled) train records, stratified by class
    where images have one label (by their first label for multi-label data; unstratified
    without labels): each class gives round(fraction x its count), at least one of a class
    with two or more images, so val's class mix is train's."""
    by_class: dict[int, list[int]] = {}
    for i, record in enumerate(train):
        by_class.setdefault(record.labels[0] if record.labels else -1, []).append(i)
    if -1 in by_class and len(by_class) > 1:
        raise SourceError(f"{source.url}: some records have labels and some do not")
    chosen = set()
    for members in by_class.values():
        n = round(len(members) * fraction)
        if by_class.keys() != {-1} and len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        chosen.update(members[:n])
    if not 0 < len(chosen) < len(train):
        raise SourceError(f"--val-fraction {fraction} leaves an empty split of {len(train)} items")
    val = [r for i, r in enumerate(train) if i in chosen]
    return val, [r for i, r in enumerate(train) if i not in chosen]


def estimate_samples_per_shard(
    source: Source, records: list[Record], shard_bytes: int, raw: bool = False
) -> int:
    """From the first 64 records: tar bytes per sample (headers and 512-byte padding included)."""
    sizes = []
    for record in records[: min(64, len(records))]:
        try:
            image = len(source.load(record)[0])
        except SourceError:
            continue
        if raw:
            image = int(np.prod(source.image_size)) * source.channels
        label = 64 if source.multi_label else 2  # a .json list or a .cls digit or two
        sizes.append(sum(BLOCK + -(-n // BLOCK) * BLOCK for n in (image, label)))
    mean = sum(sizes) / len(sizes) if sizes else 4 * BLOCK
    return max(1, int(shard_bytes // mean))


def plan_tasks(splits: dict[str, list[Record]], per_shard: int) -> list[ShardTask]:
    tasks = []
    for split, records in splits.items():
        for i, start in enumerate(range(0, len(records), per_shard)):
            tasks.append(
                ShardTask(split, f"{split}-{i:06d}.tar", tuple(records[start : start + per_shard]))
            )
    return tasks


def _plan_document(source: Source, opts: PrepareOptions, tasks: list[ShardTask]) -> dict:
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(task.name.encode())
        for r in task.records:
            digest.update(f"{r.key}:{r.labels}".encode())
    return {
        "source": source.describe(),
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        **({"pixels": opts.pixels} if opts.pixels != "encoded" else {}),  # older plans: encoded
        "shards": len(tasks),
        "records_sha256": digest.hexdigest(),
    }


def raw_layout(source: Source, records: list[Record]) -> Source:
    """The source with the image size and channels raw pixels are stored at: its own, or (for
    files) those of its first 64 images, grey only if all of them are; they must agree in size."""
    if source.image_size:
        return source
    sizes, grey = set(), True
    for record in records[:64]:
        try:
            with Image.open(io.BytesIO(source.load(record)[0])) as im:
                sizes.add((im.size[1], im.size[0]))
                grey &= im.mode in ("1", "L", "I", "I;16", "F")
        except (SourceError, OSError):
            continue
    if len(sizes) != 1:
        raise SourceError(
            f"{source.url}: images of {len(sizes) or 'no'} sizes among the first 64 "
            f"({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:4])}); raw pixels need images of "
            "one size: prepare them encoded, or resize them first"
        )
    return dataclasses.replace(source, image_size=list(sizes.pop()), channels=1 if grey else 3)


def raw_pixels(source: Source, data: bytes, key: str) -> bytes:
    """An encoded image -> its uint8 pixels (H, W, C) as bytes, in the source's size and channels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("L" if source.channels == 1 else "RGB"))
    except Exception as e:
        raise SourceError(f"{key}: cannot decode the image: {e}") from None
    if list(pixels.shape[:2]) != list(source.image_size or []):
        raise SourceError(
            f"{key}: {pixels.shape[0]}x{pixels.shape[1]} pixels where the source's images are "
            f"{source.image_size}; raw pixels need images of one size"
        )
    return pixels.tobytes()


def write_shard(task: ShardTask, ctx: tuple[Source, str, str, str]) -> dict:
    """Load, encode and write one shard; returns its part record. Runs as a Ray task."""
    source, url, endpoint_url, pixels = ctx
    fs, path = filesystem(url, endpoint_url)
    samples, skipped = [], []
    for record in task.records:
        try:
            data, ext = source.load(record)
            if pixels == "raw":
                data, ext = raw_pixels(source, data, record.key), "raw"
        except SourceError as e:
            skipped.append({"split": task.split, "key": record.key, "reason": str(e)})
            continue
        members = {ext: data, **label_members(list(record.labels), source.multi_label)}
        samples.append((record.key, members))
    tar, offsets = write_tar(samples)
    info = ShardInfo(task.name, len(samples), len(tar), sha256(tar))
    write_atomic(fs, join(path, task.name), tar)
    write_atomic(fs, join(path, info.index), index_bytes(offsets))
    part = {"split": task.split, "shard": asdict(info), "skipped": skipped}
    write_atomic(fs, join(path, WORK, "parts", task.name + ".json"), json.dumps(part).encode())
    return part


def _fit_palette(source: Source, records: list[Record], k: int, seed: int):
    def images():
        for record in records[:20000]:
            try:
                data, _ = source.load(record)
            except SourceError:
                continue
            mode = "L" if source.channels == 1 else "RGB"
            with Image.open(io.BytesIO(data)) as im:
                yield np.asarray(im.convert(mode)).reshape(im.size[1], im.size[0], -1)

    return fit_palette(sample_pixels(images(), per_image=64, seed=seed), k=k, seed=seed)


class Progress:
    """One status line, rewritten in place on a terminal, at most twice a second elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.samples = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, samples: int, nbytes: int) -> None:
        self.done += 1
        self.samples += samples
        self.bytes += nbytes
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.5 and self.done < self.total):
            return
        self.last = now
        rate = self.bytes / max(now - self.start, 1e-9)
        eta = (self.total - self.done) * (now - self.start) / self.done
        end = "\n" if self.done == self.total or not sys.stderr.isatty() else "\r"
        print(
            f"{self.label}: {self.done}/{self.total} shards, {self.samples:,} samples, "
            f"{self.bytes / 1e6:.1f} MB ({rate / 1e6:.1f} MB/s), ETA {eta:.0f}s",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def prepare(source: Source, url: str, opts: PrepareOptions = PrepareOptions()) -> Manifest:
    """Write `source` as shards + manifest to `url`; resume an interrupted run of the same plan."""
    fs, path = filesystem(url, opts.endpoint_url)
    if opts.pixels not in ("encoded", "raw"):
        raise ValueError(f"pixels must be encoded or raw, not {opts.pixels!r}")
    splits = plan_splits(source, opts)
    if opts.pixels == "raw":
        source = raw_layout(source, next(iter(splits.values())))
    per_shard = opts.samples_per_shard or estimate_samples_per_shard(
        source, next(iter(splits.values())), opts.shard_bytes, opts.pixels == "raw"
    )
    tasks = plan_tasks(splits, per_shard)
    plan = _plan_document(source, opts, tasks)

    if fs.exists(join(path, MANIFEST)):
        existing = load_manifest(url, opts.endpoint_url)
        if existing.source.get("plan") == plan:
            return existing  # already complete: re-running is a no-op
        raise DatasetError(f"{url}: already holds a different dataset; choose another URL")
    plan_path = join(path, WORK, "plan.json")
    if fs.exists(plan_path):
        previous = json.loads(fs.cat_file(plan_path))
        if previous != plan:
            raise DatasetError(
                f"{url}: holds an unfinished prepare of another plan (source, seed, split or "
                f"shard size differ); remove {join(url, WORK)} and its shards, or use another URL"
            )
    else:
        fs.makedirs(join(path, WORK, "parts"), exist_ok=True)
        write_atomic(fs, plan_path, json.dumps(plan, indent=1).encode())

    parts_dir = join(path, WORK, "parts")
    done = (
        {p.rsplit("/", 1)[-1][: -len(".json")] for p in fs.find(parts_dir)}
        if fs.exists(parts_dir)
        else set()
    )
    todo = [t for t in tasks if t.name not in done]
    progress = Progress(len(tasks), f"prepare {url}", opts.progress)
    progress.done = len(tasks) - len(todo)
    parallel_map(
        write_shard,
        todo,
        shared=(source, url, opts.endpoint_url, opts.pixels),
        executor=opts.executor,
        address=opts.ray_address,
        on_result=lambda _, part: progress.update(part["shard"]["samples"], part["shard"]["bytes"]),
    )

    parts = {t.name: json.loads(fs.cat_file(join(parts_dir, t.name + ".json"))) for t in tasks}
    manifest = Manifest(
        classes=source.classes,
        splits={name: SplitInfo() for name in splits},
        multi_label=source.multi_label,
        image_size=source.image_size,
        channels=source.channels,
        pixels=opts.pixels,
        seed=opts.seed,
        source={**source.describe(), "plan": plan, **val_record(source, splits, opts)},
        url=url,
    )
    for task in tasks:
        part = parts[task.name]
        manifest.splits[task.split].shards.append(ShardInfo(**part["shard"]))
        manifest.skipped.extend(part["skipped"])
    if opts.palette_size:
        palette = _fit_palette(source, splits["train"], opts.palette_size, opts.seed)
        write_atomic(fs, join(path, PALETTE_FILE), json.dumps(palette.to_dict()).encode())
        manifest.palette = PALETTE_FILE
    manifest.save(fs, path)  # last: from here on the dataset is complete
    fs.rm(join(path, WORK), recursive=True)
    return manifest


class _HashingReader:
    """A file wrapper that hashes and counts what is read through it."""

    def __init__(self, f) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


def index_shards(
    url: str, split: str = "train", endpoint_url: str = "", log: Callable[[str], None] = print
) -> Manifest:
    """Make a manifest for WebDataset tars written by another tool (e.g. GNU tar over a folder of
    KEY.jpg + KEY.cls files): scan each `*.tar` at `url` and write `.idx` files + dataset.json."""
    fs, path = filesystem(url, endpoint_url)
    if fs.exists(join(path, MANIFEST)):
        raise DatasetError(f"{url}: already has a {MANIFEST}")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    if not names:
        raise DatasetError(f"{url}: no .tar files to index")
    shards = []
    for name in names:
        with fs.open(join(path, name), "rb") as f:
            reader = _HashingReader(f)
            keys, offsets = scan_tar(reader)
            while reader.read(1 << 20):  # the rest (end blocks, padding) for the checksum
                pass
        if not keys:
            log(f"index: {name}: no samples, left out")
            continue
        write_atomic(fs, join(path, name.rsplit(".", 1)[0] + ".idx"), index_bytes(offsets))
        shards.append(ShardInfo(name, len(keys), reader.size, reader.hash.hexdigest()))
        log(f"index: {name}: {len(keys)} samples")
    manifest = Manifest(
        classes=[], splits={split: SplitInfo(shards)}, source={"kind": "index", "url": url}, url=url
    )
    manifest.save(fs, path)
    return manifest


def verify_shards(url: str, endpoint_url: str = "", log: Callable[[str], None] = print) -> int:
    """Read every shard a dataset's manifest lists and compare its size and sha256 with the
    manifest's; log each shard that differs. Returns the number of shards checked; raises
    DatasetError naming every shard that differs or is missing."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = load_manifest(url, endpoint_url)
    fs, path = filesystem(url, endpoint_url)
    shards = [(split, s) for split, info in manifest.splits.items() for s in info.shards]

    def check(item: tuple[str, ShardInfo]) -> str:
        split, shard = item
        where = f"{join(url, shard.name)} ({split})"
        if not shard.sha256:
            return ""  # a manifest from before shards carried their digest
        try:
            with fs.open(join(path, shard.name), "rb") as f:
                reader = _HashingReader(f)
                while reader.read(1 << 22):
                    pass
        except FileNotFoundError:
            return f"{where}: missing"
        if (reader.size, reader.hash.hexdigest()) != (shard.bytes, shard.sha256):
            return (
                f"{where}: {reader.size} bytes, sha256 {reader.hash.hexdigest()[:16]}...; the "
                f"manifest records {shard.bytes} bytes, sha256 {shard.sha256[:16]}..."
            )
        return ""

    with ThreadPoolExecutor(8) as pool:  # object storage: reads in flight, not CPU
        problems = [p for p in pool.map(check, shards) if p]
    for problem in problems:
        log(f"verify: {problem}")
    if problems:
        raise DatasetError(
            f"{url}: {len(problems)} of {len(shards)} shards differ from {MANIFEST}: "
            + "; ".join(problems[:5])
            + (" ..." if len(problems) > 5 else "")
        )
    return len(shards)
