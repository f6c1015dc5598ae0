"""The second input mode, `data.ingest: ray-data`: Ray Data decodes on CPU nodes, trainers train.

GPU nodes often lack the CPU to decode JPEGs as fast as a ViT consumes them. In this mode the
job's driver builds a Ray Dataset over the same shards: one task per shard reads it (fsspec,
ranged reads with retries, as the stream does), decodes and augments every sample (the stream's
own transform), and Ray streams the uint8 pixels or palette tokens to the training workers
(`streaming_split`, equal shares). Tasks run wherever Ray finds CPUs; with
`data.ingest_resource`, only on nodes that advertise that custom resource (start CPU-only nodes
with `ray start --resources '{"ingest": 1000}'`).

Resume guarantee: by epoch, not by sample. A restored run continues at its saved step and epoch,
with the optimizer and schedule where they were, and starts that epoch over in a fresh order:
samples it had seen may come again, and the epoch is counted once. Augmentation is not seeded
per sample. The error budget is not enforced; unreadable samples are skipped and logged. The
default, `data.ingest: stream`, resumes exactly once and is reproducible sample for sample.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data.shards import Manifest, load_manifest
from pipeline.data.stream import DataError, StreamConfig, _Reader, make_transform, stream_config
from pipeline.errors import ConfigError

STATE_FORMAT = "tessera-ray-data/1"
DATASET = "train"  # the name Ray Train knows the dataset by


def decode_shard(cfg: StreamConfig, manifest: Manifest):
    """A function: {"shard": i} -> the decoded samples of shard i, as rows."""
    transform = make_transform(cfg, manifest)
    classes = len(manifest.classes)

    def rows(item: dict[str, Any]) -> list[dict[str, Any]]:
        reader = _Reader(cfg, manifest, transform)
        shard = int(item["shard"])
        n = reader.shards[shard].samples
        fetched = reader.fetch(np.full(n, shard), np.arange(n))
        rng = random.Random()  # a fresh augmentation on every pass
        out = []
        for i in range(n):
            key, sample, reason = fetched[(shard, i)]
            if sample is not None:
                try:
                    x, labels = reader.decode(key, sample, rng)
                except Exception as e:
                    reason = f"undecodable: {e}"
            if reason:
                print(f"ray-data ingest: skipped {reader.shards[shard].name}#{i} ({key}): {reason}")
                continue
            row: dict[str, Any] = {"x": x, "key": key}
            if cfg.labels and manifest.multi_label:
                row["label"] = np.zeros(classes, np.float32)
                row["label"][labels] = 1.0
            elif cfg.labels:
                row["label"] = labels[0]
            out.append(row)
        return out

    return rows


def training_dataset(run: RunConfig):
    """The Ray Dataset of the run's training split, built by the job's driver."""
    import ray

    cfg = stream_config(run, run.data.train_split, 1, train=True)
    manifest = load_manifest(cfg.url, cfg.endpoint_url)
    shards = manifest.split(cfg.split).shards
    remote: dict[str, Any] = {"num_cpus": 1}
    if run.data.ingest_resource:
        remote["resources"] = {run.data.ingest_resource: 0.001}
    items = [{"shard": i} for i in range(len(shards))]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .randomize_block_order()
        .flat_map(decode_shard(cfg, manifest), **remote)
    )


class RayDataInput:
    """This training worker's share of the Ray Dataset, as the batches the Trainer expects."""

    def __init__(self, cfg: StreamConfig) -> None:
        try:
            import ray.train

            self.shard = ray.train.get_dataset_shard(DATASET)
        except Exception:
            self.shard = None
        if self.shard is None:
            raise ConfigError(
                "data.ingest: ray-data needs `tessera run` inside a Ray job (its driver builds "
                "the dataset); elsewhere use data.ingest=stream"
            )
        self.cfg = cfg
        self.epoch, self.batches = 0, 0
        self.cursor = SimpleNamespace(errors=0, retries=0)  # what the trainer logs

    def __iter__(self):
        key = "tokens" if self.cfg.palette is not None else "image"
        while True:
            for rows in self.shard.iter_batches(
                batch_size=self.cfg.batch_size, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=self.cfg.shuffle_buffer,
            ):  # fmt: skip
                self.batches += 1
                batch = {key: torch.from_numpy(rows["x"]), "key": list(rows["key"])}
                if "label" in rows:
                    batch["label"] = torch.from_numpy(rows["label"])
                yield batch
            if self.batches == 0:
                raise DataError(f"{self.cfg.url}: an epoch of Ray Data ingestion gave no batch")
            self.epoch, self.batches = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved epoch starts over (see the module docstring); a stream cursor works too."""
        if state.get("format") == STATE_FORMAT:
            self.epoch = int(state["epoch"])
        else:  # a checkpoint written by the exactly-once stream
            self.epoch = int(state.get("phase", {}).get("epoch", 0))

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        return states[0]  # every worker is in the same epoch
