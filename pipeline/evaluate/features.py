"""Frozen features of a whole split, streamed through the data pipeline into files on disk.

The images of a split stream in (any size of dataset); each forward's pooled features of the
asked blocks go straight into memory-mapped .npy files, so memory holds one batch, not the
dataset. A folder is complete once meta.json is written (last); a complete folder for the same
weights, split and layers is reused instead of recomputed (a re-run, a second evaluator).
Each image's features are written at its place in the split (the stream carries it), so the
arrays do not depend on how the split was read: by one process with any number of loader
workers, or by several ranks, each reading its share and rank 0 gathering the batches.
An extraction that stops (preempted, killed) resumes where it stopped: every COMMIT_S seconds
the arrays are flushed and progress.json records how many images they hold and the stream's
cursor after them, so a re-run goes on from there instead of from the first image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.stream import DataError, Stream, StreamConfig
from pipeline.data.transforms import model_input
from pipeline.train.distributed import native_bf16

META = "meta.json"
PROGRESS = "progress.json"
COMMIT_S = 30.0  # seconds of extraction between two progress records

Extractor = Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # batch -> name -> (B, D)


@dataclass
class FeatureSet:
    """Labels (N,) (or (N, K) multi-hot) and named feature arrays (N, D) of one split,
    memory-mapped read-only."""

    labels: np.ndarray
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[name], self.labels


def _load(folder: Path, names: list[str], fingerprint: str, limit: int) -> FeatureSet | None:
    meta_path = folder / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["fingerprint"] != fingerprint or not set(names) <= set(meta["names"]):
        return None
    if meta.get("limit", 0) != limit:
        return None
    n = meta["samples"]
    labels = np.load(folder / "labels.npy", mmap_mode="r")[:n]
    arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r")[:n] for k in names}
    return FeatureSet(labels, arrays)


def _resume(folder: Path, names: list[str], fingerprint: str, limit: int) -> dict | None:
    """The progress record of an interrupted extraction of the same features, if any."""
    try:
        progress = json.loads((folder / PROGRESS).read_text())
    except (FileNotFoundError, ValueError):
        return None
    same = (progress["fingerprint"], progress["names"], progress["limit"]) == (
        fingerprint, names, limit
    )  # fmt: skip
    return progress if same else None


def extract(
    fn: Extractor, names: list[str], cfg: StreamConfig, folder: Path, fingerprint: str,
    log=print, limit: int = 0, comm=None,
) -> FeatureSet | None:  # fmt: skip
    """Features `names` of every image of cfg.split (its first `limit` in the stored order when
    limit > 0), computed by `fn` or reused from `folder`, resuming an interrupted extraction.
    `fingerprint` names the weights and settings: a folder made for other ones is recomputed.

    With `comm` (a Comm of several ranks) every rank reads its share of the stream, as training
    splits it, and rank 0 gathers each batch's features and writes them at the images' places
    in the split: the same arrays as one process makes. Only rank 0 holds the folder (no shared
    disk needed) and gets the FeatureSet; the other ranks get None."""
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    leader = rank == 0
    found = _load(folder, names, fingerprint, limit) if leader else None
    exists = found is not None
    if world > 1:
        exists = comm.gather(exists, "whether the features exist")[0]
    if exists:
        return found  # None on the other ranks
    stream = Stream(dataclasses.replace(cfg, limit=limit), rank=rank, world=world)
    total = min(stream.split.samples, limit) if limit else stream.split.samples
    arrays: dict[str, np.ndarray] = {}  # rank 0's: (total, D) per name, "labels", "written"
    progress = _resume(folder, names, fingerprint, limit) if leader else None
    if world > 1:
        progress = comm.gather(progress, "the extraction's progress")[0]
    if progress is not None:
        stream.load_state_dict(progress["cursor"])
        if leader:
            arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r+")
                      for k in [*names, "labels", "written"]}  # fmt: skip
            log(f"  features {cfg.split}: resuming at {progress['samples']}/{total} images")
    elif leader:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    n = progress["samples"] if progress else 0

    def write(index: np.ndarray, out: dict[str, np.ndarray]) -> None:
        for name, values in out.items():
            if name not in arrays:
                shape = (total, *values.shape[1:])
                arrays[name] = np.lib.format.open_memmap(
                    folder / f"{name}.npy", "w+", values.dtype, shape
                )
            arrays[name][index] = values
        if "written" not in arrays:
            arrays["written"] = np.lib.format.open_memmap(
                folder / "written.npy", "w+", np.bool_, (total,)
            )
        arrays["written"][index] = True

    def commit() -> None:  # the arrays first, then the record that they hold n images
        cursor = stream.state_dict()
        if world > 1:
            cursor = Stream.merge_states(comm.gather(cursor, "the extraction's cursors"))
        if leader and arrays:
            for a in arrays.values():
                a.flush()
            record = {"fingerprint": fingerprint, "names": names, "limit": limit, "samples": n,
                      "cursor": cursor}  # fmt: skip
            tmp = folder / f".{PROGRESS}.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(folder / PROGRESS)

    start, shown = time.perf_counter(), 0.0
    committed = None  # rank 0's clock at the last commit (clocks of other nodes differ)
    with torch.inference_mode():
        for batch in stream.iter_epoch():  # the same number of batches on every rank
            values: dict[str, np.ndarray] = {}
            if len(batch["key"]):
                out = fn(batch)
                values = {k: out[k].float().cpu().numpy() for k in names}
                values["labels"] = batch["label"].numpy()
            # With each rank's batch goes its clock: every rank then takes rank 0's, and all
            # commit at the same batch (a commit gathers the cursors).
            mine = (batch["index"].numpy(), values, time.perf_counter())
            parts = comm.gather(mine, "features") if world > 1 else [mine]
            for index, features, _ in parts:
                if len(index) and leader:
                    write(index, features)
                n += len(index)
            now = parts[0][2]
            committed = now if committed is None else committed
            if leader and (now - shown > 10 or n == total):
                rate = n / max(now - start, 1e-9)
                log(f"  features {cfg.split}: {n}/{total} images ({rate:.0f}/s)")
                shown = now
            if now - committed > COMMIT_S:
                commit()
                committed = now
    if not leader:
        return None
    if not arrays:
        raise DataError(f"{cfg.url} ({cfg.split}): no readable image to compute features of")
    written = np.asarray(arrays["written"])
    if not written.all():  # samples quarantined as unreadable: their rows are left out
        keep = np.flatnonzero(written)
        for name in [*names, "labels"]:
            if name in arrays:  # a new file: the mapped one is not rewritten under its map
                np.save(folder / f".{name}.npy", np.asarray(arrays[name])[keep])
                (folder / f".{name}.npy").replace(folder / f"{name}.npy")
                arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r+")
    for a in arrays.values():
        a.flush()
    meta = {"fingerprint": fingerprint, "names": names, "samples": int(written.sum()),
            "skipped": total - int(written.sum()), "limit": limit}  # fmt: skip
    (folder / META).write_text(json.dumps(meta))
    for name in (PROGRESS, f".{PROGRESS}.tmp", "written.npy"):  # the tmp: a kill mid-record
        (folder / name).unlink(missing_ok=True)
    return _load(folder, names, fingerprint, limit)


def autocast(device: torch.device):
    """bf16 autocast where the device has bf16 matmuls (`native_bf16`); features are kept in
    fp32."""
    if device.type in ("cuda", "cpu") and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def feature_name(layer: int, grid: int = 0) -> str:
    """The array of one block under one pooling (0: the model's own, k: a k x k grid)."""
    return f"layer{layer}" if grid == 0 else f"layer{layer}-grid{grid}"


def feature_names(layers: list[int], grids: list[int]) -> list[str]:
    """The arrays of `model_extractor(..., layers, ..., grids)`, in the order it returns them."""
    return [feature_name(i, k) for i in layers for k in grids]


def model_extractor(
    model: torch.nn.Module, layers: list[int], device: torch.device, grids: list[int] = (0,)
) -> Extractor:
    """Pooled features of each block in `layers` under each pooling in `grids`."""
    names = feature_names(layers, grids)

    def fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "tokens" in batch:
            x = batch["tokens"].to(device)
        else:
            x = model_input(batch["image"].to(device))
        with autocast(device):
            feats = model.features(x, layers, grids)
        return dict(zip(names, feats, strict=True))

    return fn


def pixel_extractor(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The raw-pixel baseline: images flattened to vectors in [0, 1]."""
    return {"pixels": batch["image"].flatten(1).float() / 255}


def palette_pixel_extractor(palette) -> Extractor:
    """The raw-pixel baseline at an ImageGPT's own input: each token's palette colour."""

    def fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixels": palette.decode(batch["tokens"]).flatten(1).float() / 255}

    return fn
