"""Sources that `tessera prepare` turns into shards.

A source lists its items up front (cheap records: an index or a file URL, labels) and loads one
item's encoded image bytes on demand, so the loading runs in parallel tasks. Listing checks what
it can before any work starts: missing files, malformed lines, labels that do not match images.

  idx       MNIST-format IDX files (Fashion-MNIST, MNIST): {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
  folder    one sub-folder per class of image files
  digits    scikit-learn's bundled 8x8 digits
  jsonl     JFT-style lines {"image": path-or-URL, "labels": [...]}, several labels per image
  cifar     CIFAR-10 or CIFAR-100 in their binary format (data_batch_*.bin / train.bin), not the
            pickled Python one; CIFAR-100 takes its 100 fine labels
  npz       downsampled ImageNet (Chrabaszcz et al. 2017: 32x32 or 64x64, `train_data_batch_*.npz`,
            `val_data.npz`), read without pickle
  imagenet  ImageNet's layout: train/<wnid>/*.JPEG; val/ as class folders, or flat with the ILSVRC
            devkit's ground truth (ILSVRC2012_validation_ground_truth.txt and meta.mat) or the
            Kaggle copy's LOC_val_solution.csv

Official evaluation sets (CIFAR's test batch, ImageNet's validation set) become the "test" split:
they are what papers report on. A "val" split for choosing is carved from train by
`prepare --val-fraction` (as big_vision's ImageNet "minival" is).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
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


# ---------------------------------------------------------------------------------------------
# CIFAR, downsampled ImageNet, ImageNet


def _planar(data: np.ndarray, side: int) -> np.ndarray:
    """Rows of R plane, G plane, B plane (CIFAR's and downsampled ImageNet's layout) -> images
    (N, side, side, 3)."""
    return np.ascontiguousarray(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))


def cifar_source(url: str, endpoint_url: str = "") -> ArraySource:
    """CIFAR-10 (data_batch_1..5.bin, test_batch.bin, batches.meta.txt) or CIFAR-100 (train.bin,
    test.bin, fine_label_names.txt): records of label byte(s) then 3072 bytes of planar RGB."""
    fs, path = filesystem(url, endpoint_url)
    names = {n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)} if fs.isdir(path) else set()
    if "train.bin" in names:  # CIFAR-100: coarse label, fine label, pixels
        files, skip, meta = (
            {"train": ["train.bin"], "test": ["test.bin"]},
            2,
            "fine_label_names.txt",
        )
    elif "data_batch_1.bin" in names:
        batches = sorted(n for n in names if re.fullmatch(r"data_batch_\d+\.bin", n))
        files, skip, meta = {"train": batches, "test": ["test_batch.bin"]}, 1, "batches.meta.txt"
    else:
        raise SourceError(
            f"{url}: not a CIFAR binary folder (CIFAR-10: data_batch_1.bin ...; CIFAR-100: "
            "train.bin); the pickled Python version is not read"
        )
    record = skip + 3072
    arrays = {}
    for split, parts in files.items():
        blobs = []
        for name in parts:
            if name not in names:
                raise SourceError(f"{url}: missing {name}")
            data = fs.cat_file(join(path, name))
            if len(data) % record:
                raise SourceError(
                    f"{join(url, name)}: {len(data)} bytes is not a whole number of {record}-byte "
                    "records (truncated?)"
                )
            blobs.append(np.frombuffer(data, np.uint8).reshape(-1, record))
        rows = np.concatenate(blobs)
        arrays[split] = (_planar(rows[:, skip:], 32), rows[:, skip - 1].astype(np.int64))
    top = int(max(y.max() for _, y in arrays.values()))
    classes = [str(i) for i in range(top + 1)]
    if meta in names:
        listed = [n.strip() for n in fs.cat_file(join(path, meta)).decode().splitlines()]
        listed = [n for n in listed if n]
        if len(listed) > top:
            classes = listed
    return ArraySource.from_arrays(url, "cifar", arrays, classes)


@functools.lru_cache(maxsize=2)
def _npz_arrays(url: str, endpoint_url: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, without pickle. A local file's stored (uncompressed) members
    are memory-mapped, so a shard task reads only its own rows of a 1.5 GB file."""
    fs, path = filesystem(url, endpoint_url)
    out = {}
    try:
        if isinstance(fs, LocalFileSystem):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    name = info.filename.removesuffix(".npy")
                    if info.compress_type == zipfile.ZIP_STORED:
                        with z.open(info) as f:
                            version = np.lib.format.read_magic(f)
                            read_header = (
                                np.lib.format.read_array_header_1_0
                                if version == (1, 0)
                                else np.lib.format.read_array_header_2_0
                            )
                            shape, fortran, dtype = read_header(f)
                            header = f.tell()
                        if dtype.hasobject:
                            raise ValueError(f"{info.filename} holds Python objects (a pickle)")
                        with open(path, "rb") as raw:  # where the member's data begins
                            raw.seek(info.header_offset + 26)
                            n, m = np.frombuffer(raw.read(4), "<u2")
                        offset = info.header_offset + 30 + int(n) + int(m) + header
                        out[name] = np.memmap(
                            path, dtype, "r", offset, shape, "F" if fortran else "C"
                        )
                    else:
                        out[name] = np.load(z.open(info), allow_pickle=False)
        else:
            with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SourceError(f"{url}: not a readable .npz without pickle: {e}") from None
    return out


@dataclass
class NpzSource(Source):
    """Downsampled ImageNet: .npz files of `data` (N, 3 x side x side, planar RGB) and `labels`
    (1..1000); records point at (file, row), loaded on demand."""

    side: int = 32
    endpoint_url: str = ""

    def load(self, record: Record) -> tuple[bytes, str]:
        file, row = record.ref
        data = _npz_arrays(file, self.endpoint_url)["data"][row]
        return encode_png(_planar(np.asarray(data), self.side)[0]), "png"


def npz_source(url: str, endpoint_url: str = "") -> NpzSource:
    fs, path = filesystem(url, endpoint_url)
    names = (
        sorted(n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)) if fs.isdir(path) else []
    )
    files = {
        "train": [n for n in names if re.fullmatch(r"train_data_batch_\d+\.npz", n)],
        "test": [n for n in names if n == "val_data.npz"],
    }
    files["train"].sort(key=lambda n: int(re.findall(r"\d+", n)[0]))
    if not files["train"] or not files["test"]:
        raise SourceError(
            f"{url}: expected train_data_batch_<n>.npz and val_data.npz (downsampled ImageNet)"
        )
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    splits, side, top = {}, 0, 0
    for split, parts in files.items():
        records = []
        for name in parts:
            file = protocol + join(path, name)
            arrays = _npz_arrays(file, endpoint_url)
            if "data" not in arrays or "labels" not in arrays:
                raise SourceError(f"{file}: needs arrays 'data' and 'labels'; has {sorted(arrays)}")
            data, labels = arrays["data"], np.asarray(arrays["labels"]).reshape(-1)
            if data.ndim != 2 or len(data) != len(labels):
                raise SourceError(
                    f"{file}: data {data.shape} and labels {labels.shape} do not pair up"
                )
            this = round((data.shape[1] / 3) ** 0.5)
            if 3 * this * this != data.shape[1] or (side and this != side):
                raise SourceError(
                    f"{file}: rows of {data.shape[1]} values are not 3 x {side or 'n'}^2"
                )
            side = this
            if labels.min() < 1:
                raise SourceError(f"{file}: labels run from 1 (to 1000); found {labels.min()}")
            top = max(top, int(labels.max()))
            stem = name.removesuffix(".npz")
            records += [
                Record(f"{stem}_{i:07d}", (int(labels[i]) - 1,), (file, i))
                for i in range(len(data))
            ]
        splits[split] = records
    classes = [str(i) for i in range(top)]
    return NpzSource(url, classes, False, 3, [side, side], splits, "npz", side, endpoint_url)


def _wnid_folders(fs, path: str) -> list[str]:
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1]
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    )


def _devkit_labels(fs, url: str, path: str, classes: list[str]) -> dict[str, str] | None:
    """{validation file stem: wnid} from the ILSVRC devkit (ground truth + meta.mat) or the
    Kaggle copy's LOC_val_solution.csv, looked for in the dataset folder and up to three
    folders above it; None when neither is there."""
    parts = path.rstrip("/").split("/")
    roots = ["/".join(parts[: len(parts) - k]) or "/" for k in range(4) if len(parts) - k > 0]
    for root in roots:
        csv = join(root, "LOC_val_solution.csv")
        if fs.exists(csv):
            out = {}
            for n, line in enumerate(fs.cat_file(csv).decode().splitlines()[1:], 2):
                if not line.strip():
                    continue
                image, _, boxes = line.partition(",")
                wnid = boxes.split()[0] if boxes.split() else ""
                if wnid not in classes:
                    raise SourceError(f"{csv}:{n}: class {wnid!r} is not a train folder")
                out[image.strip()] = wnid
            return out
        for data in (
            join(root, "ILSVRC2012_devkit_t12", "data"),
            join(root, "devkit", "data"),
            root,
        ):
            truth = join(data, "ILSVRC2012_validation_ground_truth.txt")
            if fs.exists(truth):
                meta = join(data, "meta.mat")
                if not fs.exists(meta):
                    raise SourceError(
                        f"{truth}: needs the devkit's meta.mat beside it (ids -> wnids)"
                    )
                from scipy.io import loadmat

                synsets = loadmat(io.BytesIO(fs.cat_file(meta)), squeeze_me=True)["synsets"]
                wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
                ids = [int(x) for x in fs.cat_file(truth).decode().split()]
                return {f"ILSVRC2012_val_{i:08d}": wnid_of[k] for i, k in enumerate(ids, 1)}
    return None


def imagenet_source(url: str, endpoint_url: str = "") -> FileSource:
    """train/<wnid>/ images; val/ as class folders, or flat with the devkit's or Kaggle's ground
    truth. Classes: the train folders' wnids, sorted (torchvision's order). val becomes "test"."""
    fs, path = filesystem(url, endpoint_url)
    if not (fs.isdir(join(path, "train")) and fs.isdir(join(path, "val"))):
        raise SourceError(f"{url}: expected train/<wnid>/ and val/ folders (ImageNet's layout)")
    train = folder_source(join(url, "train"), endpoint_url)
    classes, index = train.classes, {c: i for i, c in enumerate(train.classes)}
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    val_path = join(path, "val")
    folders = _wnid_folders(fs, val_path)
    records = []
    if folders:
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise SourceError(f"{url}/val: class folders not in train: {', '.join(unknown[:5])}")
        for wnid in folders:
            for f in sorted(fs.find(join(val_path, wnid))):
                if _ext(f) in IMAGE_EXTS:
                    stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                    records.append(Record(stem, (index[wnid],), protocol + f))
    else:
        truth = _devkit_labels(fs, url, path, classes)
        if truth is None:
            raise SourceError(
                f"{url}/val is flat: needs LOC_val_solution.csv (Kaggle) or the ILSVRC devkit's "
                "ILSVRC2012_validation_ground_truth.txt and meta.mat, in the dataset folder or above"
            )
        for f in sorted(fs.find(val_path)):
            if _ext(f) not in IMAGE_EXTS:
                continue
            stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if stem not in truth:
                raise SourceError(f"{protocol + f}: no ground truth for {stem}")
            records.append(Record(stem, (index[truth[stem]],), protocol + f))
    if not records:
        raise SourceError(f"{url}/val: no images")
    splits = {"train": train.splits["train"], "test": records}
    return FileSource(url, classes, False, 3, None, splits, "imagenet", endpoint_url)


FORMATS = ("idx", "folder", "digits", "jsonl", "cifar", "npz", "imagenet")


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
    if fmt == "cifar":
        return cifar_source(url, endpoint_url)
    if fmt == "npz":
        return npz_source(url, endpoint_url)
    if fmt == "imagenet":
        return imagenet_source(url, endpoint_url)
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
        if "data_batch_1.bin" in names or "train.bin" in names:
            return "cifar"
        if "val_data.npz" in names:
            return "npz"
        if "train" in names and "val" in names:
            return "imagenet"
        return "folder"
    raise SourceError(
        f"{url}: cannot tell the source format; pass --format, one of {', '.join(FORMATS)}"
    )
