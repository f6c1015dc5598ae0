"""WebDataset tar shards, their byte-offset indexes, and the dataset manifest.

A dataset URL holds:
  dataset.json          the manifest, written last: splits, shards (samples, bytes, sha256),
                        classes, image size, palette; a dataset without it is not complete
  train-000000.tar      ordinary WebDataset tars: members KEY.png|jpg + KEY.cls (one label) or
                        KEY.json ({"labels": [...]}, several labels), members of a sample adjacent
  train-000000.idx      byte offset of every sample's first tar header, plus the end offset
                        (little-endian uint64, samples + 1 values); lets a reader start mid-shard
                        and read any run of samples with one ranged request

The per-sample offsets live in one small index file per shard, named by the manifest, rather
than inline in dataset.json, so the manifest of a 300M-image collection stays a few MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

from pipeline.storage import filesystem, join, read_range, write_atomic

MANIFEST = "dataset.json"
FORMAT = "tessera-dataset/1"
BLOCK = 512
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "gif")


class DatasetError(ValueError):
    """A dataset that cannot be used as it is: names the URL and what is wrong."""


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: "dir/abc.seg.png" -> ("dir/abc", "seg.png")."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


# ---------------------------------------------------------------------------------------------
# Writing


def label_members(labels: list[int], multi_label: bool) -> dict[str, bytes]:
    if multi_label:
        return {"json": json.dumps({"labels": labels}).encode()}
    return {"cls": str(labels[0]).encode()}


def write_tar(samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[bytes, np.ndarray]:
    """(key, {ext: bytes}) samples -> (tar bytes, offsets). Byte-for-byte deterministic: fixed
    mtime, owner and mode. offsets[i] is where sample i's first header starts; offsets[-1] is
    where the end-of-archive blocks start."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            offsets.append(tf.offset)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
        offsets.append(tf.offset)
    return buf.getvalue(), np.asarray(offsets, dtype=np.uint64)


def index_bytes(offsets: np.ndarray) -> bytes:
    return np.asarray(offsets, dtype="<u8").tobytes()


def read_index(fs: AbstractFileSystem, path: str) -> np.ndarray:
    data = fs.cat_file(path)
    if len(data) % 8 or len(data) < 8:
        raise DatasetError(f"{path}: not a shard index ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<u8").astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Reading


class TarFormatError(ValueError):
    pass


def _octal(field_bytes: bytes, at: int = -1) -> int:
    if field_bytes[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:  # a damaged header: the sample's own fault, not the shard's
        raise TarFormatError(f"malformed tar header field {text[:12]!r} at byte {at}") from None


def _check_header(header: bytes, at: int) -> None:
    stored = _octal(header[148:156], at)
    actual = sum(header) - sum(header[148:156]) + 8 * 32  # the field counts as 8 spaces
    if stored != actual:
        raise TarFormatError(f"bad tar header checksum at byte {at}")


def iter_tar(
    data: bytes, base: int = 0, begin: int = 0, stop: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """Regular-file members (name, bytes) of a run of tar bytes, data[begin:stop], that starts
    at a header (taken in place: a member's bytes are the one copy made).

    Handles ustar prefixes, GNU long names and pax path records. Stops at the end-of-archive
    block or at `stop`; raises TarFormatError if a member is cut short (a truncated shard) or a
    header is corrupt. `base` is data's offset in its file, for messages.
    """
    pos, long_name, stop = begin, None, len(data) if stop is None else min(stop, len(data))
    while pos + BLOCK <= stop:
        header = data[pos : pos + BLOCK]
        if header.count(0) == BLOCK:
            return
        _check_header(header, base + pos)
        size = _octal(header[124:136], base + pos)
        kind = header[156:157]
        start, end = pos + BLOCK, pos + BLOCK + size
        if end > stop:
            raise TarFormatError(f"member at byte {base + pos} ends past the data (truncated)")
        body = data[start:end]
        if kind == b"L":
            long_name = body.rstrip(b"\0").decode()
        elif kind in (b"x", b"g"):
            for record in body.decode("utf-8", "replace").splitlines():
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[len("path=") :]
        else:
            if kind in (b"0", b"\0", b"7"):
                name = header[0:100].rstrip(b"\0").decode()
                if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                    name = header[345:500].rstrip(b"\0").decode() + "/" + name
                yield (long_name or name), body
            long_name = None
        pos = start + -(-size // BLOCK) * BLOCK
    if pos < stop:
        raise TarFormatError(f"data ends inside a tar header at byte {base + pos} (truncated)")


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Adjacent members with the same key -> (key, {ext: bytes})."""
    key, sample = None, {}
    for name, body in members:
        k, ext = split_key(name)
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = body
    if sample:
        yield key, sample


def scan_tar(fileobj: io.BufferedIOBase) -> tuple[list[str], np.ndarray]:
    """Index a tar made by any tool: (keys, offsets); offsets[-1] ends the last sample.

    offsets[i] is the first header (extended headers included) of sample i. In a truncated tar
    the member cut short is left out; a sample left with only some of its members is kept, and
    the stream quarantines it when it is read (e.g. as missing its label).
    """
    keys, offsets = [], []
    end = 0
    pending = None  # the member just announced; complete once tarfile has read past it

    def commit(member: tuple[str, int, int]) -> None:
        nonlocal end
        key, offset, member_end = member
        if not keys or keys[-1] != key:
            keys.append(key)
            offsets.append(offset)
        end = member_end

    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for info in tf:
                if pending:
                    commit(pending)
                    pending = None
                if info.isfile():
                    padded = -(-info.size // BLOCK) * BLOCK
                    pending = (split_key(info.name)[0], info.offset, info.offset_data + padded)
            if pending:
                commit(pending)
    except (tarfile.ReadError, EOFError):
        pass  # truncated: the pending member was cut short; keep the ones before it
    if keys:
        offsets.append(end)
    return keys, np.asarray(offsets, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardInfo:
    name: str  # tar file name, relative to the dataset URL
    samples: int
    bytes: int
    sha256: str = ""

    @property
    def index(self) -> str:
        return self.name.rsplit(".", 1)[0] + ".idx"


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    multi_label: bool = False
    image_size: list[int] | None = None  # [height, width]; None when sizes vary
    channels: int = 3
    pixels: str = "encoded"  # or "raw": KEY.raw holds image_size x channels uint8 pixels
    palette: str = ""  # palette file name (tessera-palette/1 JSON), when one was fitted
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # source items left out, why
    url: str = field(default="", compare=False)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("url")
        data["splits"] = {
            name: {
                "samples": split.samples,
                "shards": [dataclasses.asdict(s) for s in split.shards],
            }
            for name, split in self.splits.items()
        }
        return json.dumps({"format": FORMAT, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str, url: str) -> Manifest:
        where = join(url, MANIFEST)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON: {e}") from None
        if data.pop("format", None) != FORMAT:
            raise DatasetError(f"{where}: not a Tessera dataset manifest (format != {FORMAT})")
        try:
            splits = {}
            for name, split in data.pop("splits").items():
                shards = [ShardInfo(**s) for s in split["shards"]]
                splits[name] = SplitInfo(shards)
                if splits[name].samples != split["samples"]:
                    raise DatasetError(
                        f"{where}: split {name!r} says {split['samples']} samples but its shards "
                        f"hold {splits[name].samples}"
                    )
            return cls(splits=splits, url=url, **data)
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{where}: malformed manifest: {e}") from None

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(
                f"{self.url}: no split {name!r}; the dataset has {', '.join(self.splits) or 'none'}"
            )
        return self.splits[name]

    def save(self, fs: AbstractFileSystem, path: str) -> None:
        write_atomic(fs, join(path, MANIFEST), self.to_json().encode())


def load_manifest(url: str, endpoint_url: str = "") -> Manifest:
    """Read `url/dataset.json`; a missing one is an error that says why it may be missing."""
    fs, path = filesystem(url, endpoint_url)
    try:
        text = fs.cat_file(join(path, MANIFEST)).decode()
    except FileNotFoundError:
        hint = (
            "the folder does not exist"
            if not fs.exists(path)
            else "it is written last, so `tessera prepare` did not finish (re-run it to resume) "
            "or these shards were never indexed (`tessera index`)"
        )
        raise DatasetError(f"{url}: no {MANIFEST}: {hint}") from None
    return Manifest.from_json(text, url)


def check_shards(manifest: Manifest, split: str, endpoint_url: str = "") -> list[str]:
    """Before any work: every shard and index of `split` exists. Returns warnings for shards whose
    size differs from the manifest (read anyway; their unreadable samples are quarantined)."""
    fs, path = filesystem(manifest.url, endpoint_url)
    listing = {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size", 0)
        for info in fs.ls(path, detail=True)
    }
    missing, warnings = [], []
    for shard in manifest.split(split).shards:
        for name in (shard.name, shard.index):
            if name not in listing:
                missing.append(name)
        if shard.name in listing and listing[shard.name] != shard.bytes:
            warnings.append(
                f"{shard.name}: {listing[shard.name]} bytes, the manifest says {shard.bytes} "
                "(truncated or rewritten?)"
            )
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(
            f"{manifest.url}: the manifest does not match its shards: missing {shown}"
        )
    return warnings


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_samples(
    fs: AbstractFileSystem,
    path: str,
    offsets: np.ndarray,
    first: int,
    last: int,
    on_retry=None,
    deadline_s: float | None = None,
) -> Iterator[tuple[int, str | None, dict[str, bytes] | None, str]]:
    """Samples first..last (inclusive) of one shard with one ranged read.

    Yields (member index, key, {ext: bytes}, "") or (member index, key-or-None, None, reason)
    for samples that are cut short or unparseable.
    """
    start, end = int(offsets[first]), int(offsets[last + 1])
    data = read_range(fs, path, start, end, on_retry=on_retry, deadline_s=deadline_s)
    for i in range(first, last + 1):
        a, b = int(offsets[i]) - start, int(offsets[i + 1]) - start
        if b > len(data):
            yield i, None, None, "truncated shard"
            continue
        try:
            grouped = list(group_samples(iter_tar(data, start, a, b)))
        except (TarFormatError, UnicodeDecodeError) as e:
            yield i, None, None, f"bad tar data: {e}"
            continue
        if len(grouped) != 1:
            yield i, None, None, f"expected one sample between its offsets, found {len(grouped)}"
            continue
        key, sample = grouped[0]
        yield i, key, sample, ""
