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
per sample. The default, `data.ingest: stream`, resumes exactly once and is reproducible
sample for sample.

Errors: a decode task skips a sample that cannot be read or decoded, and its shard's first row
carries the count and the first reasons (`bad`, `bad_detail`) to the trainer, which counts them
per epoch (TensorBoard `data/errors`) and enforces `data.max_error_rate` as the stream does,
naming the worst shards. A shard with no good sample at all has no row to carry its count: the
task fails instead, naming it. A store that stays unreachable fails the task after
`data.storage_deadline_s` (Ray Data retries it) rather than skipping its samples.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data.shards import Manifest, load_manifest
from pipeline.data.stream import (
    DataError,
    StreamConfig,
    _Reader,
    budget_error,
    make_transform,
    over_budget,
    stream_config,
)
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
        name = reader.shards[shard].name
        out, bad = [], []
        for i in range(n):
            key, sample, reason = fetched[(shard, i)]
            if sample is not None:
                try:
                    x, labels = reader.decode(key, sample, rng)
                except Exception as e:
                    reason = f"undecodable: {e}"
            if reason:
                bad.append({"key": key or f"{name}#{i}", "shard": name, "reason": reason})
                continue
            row: dict[str, Any] = {"x": x, "key": key, "bad": 0, "bad_detail": ""}
            if cfg.labels and manifest.multi_label:
                row["label"] = np.zeros(classes, np.float32)
                row["label"][labels] = 1.0
            elif cfg.labels:
                row["label"] = labels[0]
            out.append(row)
        if bad and not out:
            raise DataError(f"{cfg.url}: no sample of shard {name} can be read: {bad[0]['reason']}")
        if bad:  # carried by the shard's first row: the trainer counts them
            out[0]["bad"], out[0]["bad_detail"] = len(bad), json.dumps(bad[:20])
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
        # What the trainer logs; counted per epoch, like the stream's error budget.
        self.cursor = SimpleNamespace(errors=0, retries=0, seen=0, quarantine=[])

    def __iter__(self):
        key = "tokens" if self.cfg.palette is not None else "image"
        while True:
            for rows in self.shard.iter_batches(
                batch_size=self.cfg.batch_size, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=self.cfg.shuffle_buffer,
            ):  # fmt: skip
                self.batches += 1
                self._count(rows)
                batch = {key: torch.from_numpy(rows["x"]), "key": list(rows["key"])}
                if "label" in rows:
                    batch["label"] = torch.from_numpy(rows["label"])
                yield batch
            if self.batches == 0:
                raise DataError(f"{self.cfg.url}: an epoch of Ray Data ingestion gave no batch")
            self.epoch, self.batches = self.epoch + 1, 0
            self.cursor.errors, self.cursor.seen, self.cursor.quarantine = 0, 0, []

    def _count(self, rows: dict[str, Any]) -> None:
        """The skipped samples the decode tasks reported in these rows, against the budget."""
        c, rate = self.cursor, self.cfg.max_error_rate
        bad = int(np.sum(rows["bad"])) if "bad" in rows else 0
        c.errors += bad
        c.seen += len(rows["key"]) + bad
        for detail in rows.get("bad_detail", []):
            if detail:
                c.quarantine.extend(json.loads(detail))
        if over_budget(c.errors, c.seen, rate):
            where = f"{self.cfg.url} ({self.cfg.split}, Ray Data)"
            raise budget_error(where, c.errors, c.seen, rate, c.quarantine)

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
