"""Two nodes rehearsed on one machine: one rank each, started as a cluster starts them, each
with its own staging folder and no filesystem in common; the run folder is on S3 (moto).

The scenario: pretrain on two nodes; one node's rank is killed mid-run; the run resumes on one
node (another world size: DeepSpeed's universal format), then on two nodes again (universal
again, converted on every node). The readers (ranks x data.workers) and the micro-batch stay
the same throughout (one loader worker per rank on two nodes, two on one node, accumulating
two micro-batches), so every step sees the samples it would have seen uninterrupted. Checked
against an uninterrupted two-node run: the keys of every step, the cursor's quarantine, `seen`
and `errors`, and the weights, equal up to the order of fp32 sums (all-reduce on two ranks,
accumulation on one).
"""

import io
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, free_port
from test_train import losses, wait

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH, STEPS, CORRUPT = 160, 16, 20, {"d-017", "d-090", "d-133"}  # 10 steps an epoch
TIMEOUT = 600


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_digits(url: str) -> None:
    """160 digits in 4 shards on S3; three of them are not images."""
    from sklearn.datasets import load_digits

    from pipeline.data.prepare import index_shards
    from pipeline.data.shards import write_tar

    digits = load_digits()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for s in range(4):
        samples = []
        for i in range(s * 40, (s + 1) * 40):
            key = f"d-{i:03d}"
            image = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
            data = b"\x89PNG\r\n\x1a\nnot an image" if key in CORRUPT else png(image)
            samples.append((key, {"png": data, "cls": str(digits.target[i]).encode()}))
        fs.pipe(f"{url.removeprefix('s3://')}/train-{s}.tar", write_tar(samples)[0])
    index_shards(url, log=lambda _: None)


def write_config(folder: Path, data: str, output: str) -> Path:
    raw = {
        "model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1, "num_classes": 10},
        "data": {"url": data, "workers": 1, "shuffle_buffer": 64, "augment": "none",
                 "max_error_rate": 0.05},
        "train": {"objective": "supervised", "steps": STEPS, "global_batch_size": BATCH,
                  "output": output},
        # fp32 and a constant lr: a run stopped early by --set train.steps follows the same path
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": BATCH // 2},
        "checkpoint": {"every_steps": 3, "keep_last": 10},
        "logging": {"every_steps": 1, "peak_tflops": 0.1},
    }  # fmt: skip
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Cluster:
    """Nodes of one rank each on this machine: each its own working folder and staging folder,
    started by torchrun with a static rendezvous on loopback."""

    def __init__(self, tmp: Path, config: Path, keys: Path) -> None:
        self.tmp, self.config, self.keys, self.launches = tmp, config, keys, 0

    def node_dir(self, node: int) -> Path:
        path = self.tmp / f"node{node}"
        (path / "staging").mkdir(parents=True, exist_ok=True)
        return path

    def start(self, nodes: int, *args: str, extra: dict | None = None) -> list[subprocess.Popen]:
        self.launches += 1
        port = str(free_port())
        procs = []
        for node in range(nodes):
            where = self.node_dir(node)
            env = {
                **os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                "TESSERA_STAGING": str(where / "staging"), "TESSERA_TEST_KEYS": str(self.keys),
                "TESSERA_TEST_LAUNCH": str(self.launches), **(extra or {}),
            }  # fmt: skip
            cmd = [
                BIN / "torchrun", "--nnodes", nodes, "--nproc-per-node", 1, "--node-rank", node,
                "--master-addr", "127.0.0.1", "--master-port", port,
                ROOT / "tests" / "record_keys.py", self.config, *args,
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    list(map(str, cmd)), cwd=where, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, start_new_session=True,
                )
            )  # fmt: skip
        return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [wait(p) for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def final_trajectory(keys: Path) -> dict[int, list[str]]:
    """step -> the keys drawn for it by the last launch that ran it (a replay after a resume
    replaces what a killed launch drew)."""
    by_step: dict[int, tuple[int, list[str]]] = {}
    for file in sorted(keys.glob("keys-*.jsonl")):
        for line in file.read_text().splitlines():
            r = json.loads(line)
            launch, drawn = by_step.get(r["step"], (0, []))
            if r["launch"] > launch:
                drawn = []
            if r["launch"] >= launch:
                by_step[r["step"]] = (r["launch"], drawn + r["keys"])
    return {step: drawn for step, (_, drawn) in by_step.items()}


def trainer_state(run: str, step: int) -> dict:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    path = f"{run.removeprefix('s3://')}/checkpoints/step-{step:07d}/trainer.json"
    return json.loads(fs.cat_file(path))


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_survive_a_kill_and_two_world_size_changes(
    tmp_path, s3_bucket
):
    data = f"{s3_bucket}/digits"
    corrupt_digits(data)
    for folder in ("clean", "clean-keys", "run", "keys"):
        (tmp_path / folder).mkdir()
    clean = f"{s3_bucket}/clean"
    config = write_config(tmp_path / "clean", data, clean)
    finish(Cluster(tmp_path / "clean", config, tmp_path / "clean-keys").start(2))

    run = f"{s3_bucket}/run"
    cluster = Cluster(
        tmp_path / "run", write_config(tmp_path / "run", data, run), tmp_path / "keys"
    )
    # 1. Two nodes; node 1's rank dies as it starts step 8 (steps 3 and 6 are complete).
    procs = cluster.start(2, extra={"TESSERA_TEST_DIE_AT": "1:8"})
    outs = [wait(p) for p in procs]
    assert "KILL rank 1 at step 8" in outs[1], outs[1][-2000:]
    # the survivor stops with an error instead of waiting for its peer
    assert procs[0].returncode != 0 and "step 8/" not in outs[0], outs[0][-2000:]
    # 2. One node with two loader workers, to step 14: a checkpoint of 2 ranks, resumed by 1.
    (out,) = finish(cluster.start(1, "--set", "train.steps=14", "--set", "data.workers=2"))
    assert "was written by 2 ranks at ZeRO-2; converting it for 1 ranks" in out
    # 3. Two nodes again, to the end: a checkpoint of 1 rank, resumed by 2; each node converts
    # it in its own staging folder.
    outs = finish(cluster.start(2))
    assert "resumed from" in outs[0] and "at step 14" in outs[0]
    assert max(losses(outs[0])) == STEPS
    for node in range(2):
        staged = list((cluster.node_dir(node) / "staging").rglob("universal/step-0000014/COMPLETE"))
        assert staged, f"node {node} has no universal copy of step 14"

    # Every sample once per epoch (by key), none of the corrupt ones, each in the step it is
    # drawn in uninterrupted.
    drawn = final_trajectory(tmp_path / "keys")
    clean_drawn = final_trajectory(tmp_path / "clean-keys")
    assert sorted(drawn) == list(range(1, STEPS + 1))
    assert all(sorted(drawn[s]) == sorted(clean_drawn[s]) for s in drawn)
    for epoch in range(STEPS * BATCH // SAMPLES):
        steps = range(epoch * 10 + 1, epoch * 10 + 11)
        keys = Counter(k for s in steps for k in drawn[s])
        assert max(keys.values()) == 1 and len(keys) == SAMPLES - len(CORRUPT), epoch
        assert not CORRUPT & set(keys)
    # The cursor's counts equal the uninterrupted run's.
    want, got = trainer_state(clean, STEPS), trainer_state(run, STEPS)
    for key in ("seen", "errors"):
        assert got["stream"][key] == want["stream"][key], key
    pairs = Counter((q["key"], q["epoch"]) for q in got["stream"]["quarantine"])
    assert pairs == Counter((q["key"], q["epoch"]) for q in want["stream"]["quarantine"])
    assert {k for k, _ in pairs} == CORRUPT and set(pairs.values()) == {1}
    # The weights: the same samples in every step; only the order of fp32 sums differs.
    from safetensors.torch import load_file

    for name in ("clean", "run"):
        subprocess.run(
            [BIN / "tessera", "export", f"{s3_bucket}/{name}", str(tmp_path / f"{name}-export")],
            check=True, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
    a = load_file(tmp_path / "clean-export" / "model.safetensors")
    b = load_file(tmp_path / "run-export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_local_output_that_two_nodes_do_not_share_is_refused(tmp_path, digits_url):
    """Each node resolves the relative train.output in its own folder, as two machines would."""
    config = tmp_path / "run.yaml"
    raw = {
        "model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1, "num_classes": 10},
        "data": {"url": digits_url, "workers": 0, "augment": "none"},
        "train": {"steps": 2, "global_batch_size": 16, "output": "runs/local"},
    }
    config.write_text(yaml.safe_dump(raw))
    cluster = Cluster(tmp_path, config, tmp_path)
    port = str(free_port())
    procs = []
    for node in range(2):
        cmd = [
            BIN / "torchrun", "--nnodes", 2, "--nproc-per-node", 1, "--node-rank", node,
            "--master-addr", "127.0.0.1", "--master-port", port,
            "-m", "pipeline.cli", "pretrain", config,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                list(map(str, cmd)), cwd=cluster.node_dir(node), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
        )  # fmt: skip
    outs = [wait(p) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "train.output: runs/local is a local folder that ranks [1] do not share" in outs[0]
    assert not list((cluster.node_dir(0) / "runs" / "local").glob("checkpoints/*"))
