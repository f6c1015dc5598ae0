"""Frozen features of a whole split, streamed through the data pipeline into files on disk.

The images of a split stream in (any size of dataset); each forward's pooled features of the
asked blocks go straight into memory-mapped .npy files, so memory holds one batch, not the
dataset. A folder is complete once meta.json is written (last); a complete folder for the same
weights, split and layers is reused instead of recomputed (a re-run, a second evaluator).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.stream import Stream, StreamConfig
from pipeline.data.transforms import model_input
from pipeline.train.distributed import native_bf16

META = "meta.json"

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


def extract(
    fn: Extractor, names: list[str], cfg: StreamConfig, folder: Path, fingerprint: str,
    log=print, limit: int = 0,
) -> FeatureSet:  # fmt: skip
    """Features `names` of every image of cfg.split (the first `limit` in the split's order when
    limit > 0), computed by `fn` or reused from `folder`. `fingerprint` names the weights and
    settings: a folder made for other ones is recomputed."""
    found = _load(folder, names, fingerprint, limit)
    if found is not None:
        return found
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stream = Stream(cfg, rank=0, world=1)
    total = min(stream.split.samples, limit) if limit else stream.split.samples
    labels: np.ndarray | None = None  # (N,) class ids, or (N, K) multi-hot: as the first batch
    arrays: dict[str, np.ndarray] = {}
    n, start, shown = 0, time.perf_counter(), 0.0
    with torch.inference_mode():
        for batch in stream.iter_epoch():
            b = min(len(batch["key"]), total - n)
            if b == 0:
                continue
            if b < len(batch["key"]):
                batch = {k: v[:b] for k, v in batch.items()}
            out = fn(batch)
            for name in names:
                f = out[name].float().cpu().numpy()
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        folder / f"{name}.npy", "w+", np.float32, (total, f.shape[1])
                    )
                arrays[name][n : n + b] = f
            y = batch["label"].numpy()
            if labels is None:
                labels = np.lib.format.open_memmap(
                    folder / "labels.npy", "w+", y.dtype, (total, *y.shape[1:])
                )
            labels[n : n + b] = y
            n += b
            now = time.perf_counter()
            if now - shown > 10 or n == total:
                rate = n / max(now - start, 1e-9)
                log(f"  features {cfg.split}: {n}/{total} images ({rate:.0f}/s)")
                shown = now
            if n == total:
                break
    if labels is None:  # an empty split
        labels = np.lib.format.open_memmap(folder / "labels.npy", "w+", np.int64, (0,))
    for a in [labels, *arrays.values()]:
        a.flush()
    meta = {"fingerprint": fingerprint, "names": names, "samples": n, "skipped": total - n}
    (folder / META).write_text(json.dumps({**meta, "limit": limit}))
    return _load(folder, names, fingerprint, limit)


def autocast(device: torch.device):
    """bf16 autocast where the device has bf16 matmuls (`native_bf16`); features are kept in
    fp32."""
    if device.type in ("cuda", "cpu") and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_extractor(model: torch.nn.Module, layers: list[int], device: torch.device) -> Extractor:
    """Pooled features of each block in `layers`, named "layer{i}"."""

    def fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "tokens" in batch:
            x = batch["tokens"].to(device)
        else:
            x = model_input(batch["image"].to(device))
        with autocast(device):
            feats = model.features(x, layers)
        return {f"layer{i}": f for i, f in zip(layers, feats, strict=True)}

    return fn


def pixel_extractor(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The raw-pixel baseline: images flattened to vectors in [0, 1]."""
    return {"pixels": batch["image"].flatten(1).float() / 255}
