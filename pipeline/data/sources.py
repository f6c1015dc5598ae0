"""Sources that `tessera prepare` turns into shards.

A source lists its items up front (cheap records: an index or a file URL, labels) and loads one
item's encoded image bytes on demand, so the loading runs in parallel tasks. Listing checks what
it can before any work starts: missing files, malformed lines, labels that do not match images.

  idx      MNIST-format IDX files (Fashion-MNIST, MNIST): {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
  folder   one sub-folder per class of image files
  digits   scikit-learn's bundled 8x8 digits
  jsonl    JFT-style lines {"image": path-or-URL, "labels": [...]}, several labels per image
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.shards import IMAGE_EXTS
from pipeline.storage import filesystem, join

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class SourceError(ValueError):
    """A source that cannot be read: names the file (and line or key) and what is wrong."""


@dataclass(frozen=True)
class Record:
    key: str  # unique within its split; becomes the WebDataset key
    labels: tuple[int, ...]
    ref: Any  # an index into the source's arrays, or a file URL


@dataclass
class Source:
    """Base: what every source tells `prepare`. Subclasses fill `splits` and implement `load`."""

    url: str
    classes: list[str] = field(default_factory=list)
    multi_label: bool = False
    channels: int = 3
    image_size: list[int] | None = None  # [H, W] when every image has it
    splits: dict[str, list[Record]] = field(default_factory=dict)
    kind: str = "source"

    def load(self, record: Record) -> tuple[bytes, str]:
        """The record's encoded image: (bytes, extension)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.url,
            "items": {k: len(v) for k, v in self.splits.items()},
        }


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class ArraySource(Source):
    """Images held as uint8 arrays (N, H, W) or (N, H, W, C); stored as PNG."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def load(self, record: Record) -> tuple[bytes, str]:
        split, index = record.ref
        return encode_png(self.arrays[split][index]), "png"

    @classmethod
    def from_arrays(
        cls,
        url: str,
        kind: str,
        arrays: dict[str, tuple[np.ndarray, np.ndarray]],
        classes: list[str],
    ) -> ArraySource:
        splits, images = {}, {}
        for split, (x, y) in arrays.items():
            if len(x) != len(y):
                raise SourceError(f"{url}: split {split!r} has {len(x)} images but {len(y)} labels")
            images[split] = x
            splits[split] = [Record(f"{i:08d}", (int(y[i]),), (split, i)) for i in range(len(x))]
        first = next(iter(images.values()))
        channels = 1 if first.ndim == 3 else first.shape[-1]
        return cls(url, classes, False, channels, list(first.shape[1:3]), splits, kind, images)


def _read_idx(fs, path: str) -> np.ndarray:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: missing IDX file") from None
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def idx_source(url: str, endpoint_url: str = "") -> ArraySource:
    """Fashion-MNIST / MNIST folder: splits "train" and "test"."""
    fs, path = filesystem(url, endpoint_url)
    names = {n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)} if fs.isdir(path) else set()

    def find(stem: str) -> str:
        for name in (stem, stem + ".gz"):
            if name in names:
                return join(path, name)
        raise SourceError(
            f"{url}: no {stem}[.gz]; an IDX folder holds train-/t10k- images and labels"
        )

    arrays = {
        split: (
            _read_idx(fs, find(f"{p}-images-idx3-ubyte")),
            _read_idx(fs, find(f"{p}-labels-idx1-ubyte")),
        )
        for split, p in (("train", "train"), ("test", "t10k"))
    }
    top = int(max(y.max() for _, y in arrays.values()))
    classes = (
        FASHION_MNIST_CLASSES
        if "fashion" in url.lower() and top == 9
        else [str(i) for i in range(top + 1)]
    )
    return ArraySource.from_arrays(url, "idx", arrays, classes)


def digits_source() -> ArraySource:
    """scikit-learn's 1,797 8x8 digits (values 0-16 scaled to 0-255): one split, "train"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource.from_arrays(
        "sklearn:digits", "digits", {"train": (images, digits.target)}, [str(i) for i in range(10)]
    )


def _ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return "jpg" if ext == "jpeg" else ext


@dataclass
class FileSource(Source):
    """Images as files (folder, JSONL); the original bytes are stored, never re-encoded."""

    endpoint_url: str = ""

    def load(self, record: Record) -> tuple[bytes, str]:
        fs, path = filesystem(record.ref, self.endpoint_url)
        data = fs.cat_file(path)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:
            raise SourceError(f"{record.ref}: not a readable image: {e}") from None
        return data, _ext(path)


def folder_source(url: str, endpoint_url: str = "") -> FileSource:
    """url/<class>/<image>: classes are the sorted sub-folder names; one split, "train"."""
    fs, path = filesystem(url, endpoint_url)
    if not fs.isdir(path):
        raise SourceError(f"{url}: not a folder")
    classes = sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1]
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    )
    if not classes:
        raise SourceError(f"{url}: no class sub-folders (expected {url}/<class>/<image files>)")
    records = []
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    for label, name in enumerate(classes):
        files = sorted(f for f in fs.find(join(path, name)) if _ext(f) in IMAGE_EXTS)
        for f in files:
            rel = f[len(path) :].lstrip("/")
            records.append(Record(rel.rsplit(".", 1)[0].replace("/", "_"), (label,), protocol + f))
    if not records:
        raise SourceError(f"{url}: class folders hold no images ({', '.join(IMAGE_EXTS)})")
    return FileSource(url, classes, False, 3, None, {"train": records}, "folder", endpoint_url)


def jsonl_source(url: str, endpoint_url: str = "") -> FileSource:
    """JFT-style: one {"image": path-or-URL, "labels": [...]} per line; relative paths are
    relative to the JSONL file; labels are class names (classes: their sorted union) or ids."""
    fs, path = filesystem(url, endpoint_url)
    try:
        lines = fs.cat_file(path).decode().splitlines()
    except FileNotFoundError:
        raise SourceError(f"{url}: no such file") from None
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, labels = item["image"], item["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(
                f'{url}:{n}: expected {{"image": ..., "labels": [...]}}: {e!r}'
            ) from None
        if not isinstance(labels, list) or not labels:
            raise SourceError(f"{url}:{n}: 'labels' must be a non-empty list; got {labels!r}")
        if not isinstance(image, str) or _ext(image) not in IMAGE_EXTS:
            raise SourceError(f"{url}:{n}: 'image' must name an image file; got {image!r}")
        items.append(
            (n, image if "://" in image or image.startswith("/") else f"{base}/{image}", labels)
        )
    if not items:
        raise SourceError(f"{url}: no lines")
    names = {lab for _, _, labels in items for lab in labels if isinstance(lab, str)}
    ints = {lab for _, _, labels in items for lab in labels if isinstance(lab, int)}
    if names and ints:
        raise SourceError(f"{url}: labels mix names and ids; use one kind")
    classes = sorted(names) if names else [str(i) for i in range(max(ints) + 1)]
    index = {c: i for i, c in enumerate(classes)}
    records = [
        Record(f"{n:09d}", tuple(sorted({index[lab] if names else lab for lab in labels})), image)
        for n, image, labels in items
    ]
    return FileSource(url, classes, True, 3, None, {"train": records}, "jsonl", endpoint_url)


FORMATS = ("idx", "folder", "digits", "jsonl")


def open_source(url: str, fmt: str = "auto", endpoint_url: str = "") -> Source:
    """A source by format name, or guessed: `digits`, *.jsonl, a folder of IDX files, a folder
    of class folders."""
    if fmt == "auto":
        fmt = _guess_format(url, endpoint_url)
    if fmt == "idx":
        return idx_source(url, endpoint_url)
    if fmt == "digits":
        return digits_source()
    if fmt == "folder":
        return folder_source(url, endpoint_url)
    if fmt == "jsonl":
        return jsonl_source(url, endpoint_url)
    raise SourceError(f"{url}: unknown source format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")


def _guess_format(url: str, endpoint_url: str) -> str:
    if url in ("digits", "sklearn:digits"):
        return "digits"
    if url.endswith((".jsonl", ".json")):
        return "jsonl"
    fs, path = filesystem(url, endpoint_url)
    if not fs.exists(path):
        raise SourceError(f"{url}: no such file or folder")
    if fs.isdir(path):
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
        if any("idx3-ubyte" in n for n in names):
            return "idx"
        return "folder"
    raise SourceError(
        f"{url}: cannot tell the source format; pass --format, one of {', '.join(FORMATS)}"
    )
