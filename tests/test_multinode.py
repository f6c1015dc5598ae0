"""Two nodes rehearsed on one machine: one rank each, started as a cluster starts them (torchrun
with a rendezvous on loopback; a Ray cluster of two `ray start` nodes), each with its own staging
folder and no filesystem in common; the run folder is on S3 (moto).

The scenario: pretrain on two nodes; one node's rank is killed mid-run (on Ray: after Ray
announced the node's preemption and the run saved for it); the run resumes on one node
(another world size: DeepSpeed's universal format), then on two nodes again (universal again,
converted on every node). The readers (ranks x data.workers) and the micro-batch stay
the same throughout (one loader worker per rank on two nodes, two on one node, accumulating
two micro-batches), so every step sees the samples it would have seen uninterrupted. Checked
against an uninterrupted two-node run: the keys of every step, the cursor's quarantine, `seen`
and `errors`, and the weights, equal up to the order of fp32 sums (all-reduce on two ranks,
accumulation on one).
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, free_port
from test_train import losses, wait

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH, STEPS, CORRUPT = 160, 16, 40, {"d-017", "d-090", "d-133"}  # 10 steps an epoch
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
    """step -> the keys drawn for it by the last launch that ran it. A launch resumed at step s
    replaces all that earlier launches drew from step s on: their replays and, for a launch
    stopped past the end (a job given steps=1000 and then cancelled), steps the run never
    reaches again."""
    records = [json.loads(line) for file in sorted(keys.glob("keys-*.jsonl"))
               for line in file.read_text().splitlines()]  # fmt: skip
    first: dict[int, int] = {}
    for r in records:
        first[r["launch"]] = min(first.get(r["launch"], r["step"]), r["step"])
    drawn: dict[int, list[str]] = {}
    for r in records:
        if not any(later > r["launch"] and start <= r["step"] for later, start in first.items()):
            drawn.setdefault(r["step"], []).extend(r["keys"])
    return drawn


def trainer_state(run: str, step: int) -> dict:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    path = f"{run.removeprefix('s3://')}/checkpoints/step-{step:07d}/trainer.json"
    return json.loads(fs.cat_file(path))


@pytest.fixture(scope="module")
def clean_run(s3_endpoint, tmp_path_factory):
    """The corrupt digits on S3 and an uninterrupted two-node run on them:
    (bucket, data url, run url, folder of its keys, folder of its export)."""
    import fsspec

    bucket = f"s3://tessera-nodes-{os.getpid()}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    data, clean = f"{bucket}/digits", f"{bucket}/clean"
    corrupt_digits(data)
    tmp = tmp_path_factory.mktemp("clean")
    (tmp / "keys").mkdir()
    finish(Cluster(tmp, write_config(tmp, data, clean), tmp / "keys").start(2))
    export(clean, tmp / "export")
    return bucket, data, clean, tmp / "keys", tmp / "export"


def assert_every_step_drew_what_it_drew_uninterrupted(keys: Path, clean_keys: Path) -> None:
    """Every sample once per epoch (by key), none of the corrupt ones, each in the step it is
    drawn in uninterrupted."""
    drawn, clean_drawn = final_trajectory(keys), final_trajectory(clean_keys)
    assert sorted(drawn) == list(range(1, STEPS + 1))
    assert all(sorted(drawn[s]) == sorted(clean_drawn[s]) for s in drawn)
    for epoch in range(STEPS * BATCH // SAMPLES):
        steps = range(epoch * 10 + 1, epoch * 10 + 11)
        keys_drawn = Counter(k for s in steps for k in drawn[s])
        assert max(keys_drawn.values()) == 1, epoch
        assert len(keys_drawn) == SAMPLES - len(CORRUPT), epoch
        assert not CORRUPT & set(keys_drawn)


def export(run: str, dest: Path) -> None:
    subprocess.run(
        [BIN / "tessera", "export", run, str(dest)], check=True, capture_output=True,
        timeout=TIMEOUT,
    )  # fmt: skip


def assert_same_counts_and_weights(clean: str, clean_export: Path, run: str, dest: Path):
    """The cursor's counters equal the uninterrupted run's, and so do the weights up to the
    order of fp32 sums (the same samples in every step)."""
    want, got = trainer_state(clean, STEPS), trainer_state(run, STEPS)
    for key in ("seen", "errors"):
        assert got["stream"][key] == want["stream"][key], key
    pairs = Counter((q["key"], q["epoch"]) for q in got["stream"]["quarantine"])
    assert pairs == Counter((q["key"], q["epoch"]) for q in want["stream"]["quarantine"])
    assert {k for k, _ in pairs} == CORRUPT and set(pairs.values()) == {1}
    from safetensors.torch import load_file

    export(run, dest)
    a = load_file(clean_export / "model.safetensors")
    b = load_file(dest / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_survive_a_kill_and_two_world_size_changes(
    tmp_path, clean_run
):
    bucket, data, clean, clean_keys, clean_export = clean_run
    for folder in ("run", "keys"):
        (tmp_path / folder).mkdir()
    run = f"{bucket}/run"
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

    assert_every_step_drew_what_it_drew_uninterrupted(tmp_path / "keys", clean_keys)
    assert_same_counts_and_weights(clean, clean_export, run, tmp_path / "export")


class RayNodes:
    """A Ray cluster of nodes of one CPU each on this machine (`ray start`, then `ray start
    --address` with its own ports), each with its own staging folder, token auth, loopback.
    Ray's preemption watcher polls every 0.5 s instead of 5."""

    def __init__(self, tmp: Path, keys: Path) -> None:
        self.tmp, self.port, self.dashboard = tmp, free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_MODE="token", RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5",
            PATH=f"{BIN}:{os.environ['PATH']}",
        )  # fmt: skip
        # the workers record the keys they draw (tests/ray_hook/sitecustomize.py)
        self.worker_env = {"PYTHONPATH": str(ROOT / "tests" / "ray_hook"),
                           "TESSERA_TEST_KEYS": str(keys)}  # fmt: skip
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True)  # fmt: skip

    def staging(self, node: int) -> Path:
        path = self.tmp / f"node{node}" / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, node: int) -> None:
        where = (
            ["--head", "--port", self.port, "--dashboard-host", "127.0.0.1",
             "--dashboard-port", self.dashboard, "--ray-client-server-port", free_port()]
            if node == 0
            else ["--address", f"127.0.0.1:{self.port}"]
        )  # fmt: skip
        cmd = [
            BIN / "ray", "start", *where, "--node-ip-address", "127.0.0.1", "--num-cpus", 1,
            "--resources", json.dumps({f"node{node}": 1}), "--disable-usage-stats",
            "--dashboard-agent-listen-port", free_port(),
        ]  # fmt: skip
        env = {**self.env, **self.worker_env, "TESSERA_STAGING": str(self.staging(node))}
        done = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def node_id(self, node: int) -> str:
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and sys.argv[2] in "
            "n['Resources']][0])"
        )
        out = subprocess.run(
            [BIN / "python", "-c", code, f"127.0.0.1:{self.port}", f"node{node}"], env=self.env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    def drain(self, node_id: str) -> None:
        """What a cloud provider's spot reclaim does through the autoscaler: a drain with a
        deadline, reason PREEMPTION."""
        cmd = [
            BIN / "ray", "drain-node", "--address", f"127.0.0.1:{self.port}", "--node-id",
            node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
            "spot instance reclaimed", "--deadline-remaining-seconds", 60,
        ]  # fmt: skip
        done = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def kill(self, node: int) -> int:
        """The machine is gone: every process of the node (its raylet, agents and workers)
        SIGKILLed at once."""
        mark = f"TESSERA_STAGING={self.staging(node)}".encode()
        killed = 0
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed += 1
            except (OSError, ProcessLookupError):
                pass
        return killed

    def submit(self, config: Path, *options: str) -> subprocess.Popen:
        env = {**self.env, "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard}",
               "TMPDIR": str(self.tmp)}  # fmt: skip
        sets = [a for o in options for a in ("--set", o)]
        return subprocess.Popen(
            [str(ROOT / "launch" / "ray-submit.sh"), str(config), *sets], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run([BIN / "ray", "stop", "--force"], env=self.env, capture_output=True,
                       timeout=120)  # fmt: skip


class Job:
    """A submitted job whose log is read as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, what: str):
        deadline = time.monotonic() + TIMEOUT
        while not (found := condition()):
            assert self.proc.poll() is None, f"ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what}:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        return found

    def stop(self, nodes: "RayNodes") -> None:
        job_id = re.search(r"Job '(raysubmit_\w+)' submitted", self.text()).group(1)
        env = {**nodes.env, "RAY_ADDRESS": f"http://127.0.0.1:{nodes.dashboard}"}
        subprocess.run([BIN / "ray", "job", "stop", job_id], env=env, capture_output=True,
                       timeout=120)  # fmt: skip
        self.proc.wait(120)
        self.reader.join(30)


def checkpoints(run: str) -> list[int]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    found = fs.glob(f"{run.removeprefix('s3://')}/checkpoints/step-*/COMPLETE")
    return sorted(int(re.search(r"step-(\d+)", p).group(1)) for p in found)


@pytest.mark.slow
def test_a_ray_cluster_of_two_nodes_saves_on_preemption_and_survives_two_world_size_changes(
    tmp_path, clean_run
):
    bucket, data, clean, clean_keys, clean_export = clean_run
    run = f"{bucket}/ray"
    config = write_config(tmp_path, data, run)
    raw = yaml.safe_load(config.read_text())
    raw["job"] = {"workers": 2, "stages": ["pretrain"], "max_failures": 0}
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "keys").mkdir()
    nodes = RayNodes(tmp_path, tmp_path / "keys")
    try:
        nodes.start(0)
        nodes.start(1)
        # 1. Two nodes, no checkpoint due (and no end in sight: with a constant lr, the step
        # count changes nothing else). Once the workers are placed, Ray announces node 1's
        # preemption: the run saves at the step the notice reaches it and trains on. Then node
        # 1 is gone; Ray Train waits for a replacement node (as it should on a cluster with an
        # autoscaler); the job is stopped instead.
        drained = nodes.node_id(1)
        job = Job(nodes.submit(config, "checkpoint.every_steps=1000", "train.steps=1000"))
        job.wait_for(lambda: "Started training worker group" in job.text(), "the workers")
        nodes.drain(drained)
        notice = job.wait_for(
            lambda: re.search(
                r"Ray is draining the node of ranks \[\d\], \d+ s left: checkpoint "
                r"\S+step-(\d+) saved; training on", job.text(),
            ),
            "the run to save on Ray's preemption notice",
        )  # fmt: skip
        assert nodes.kill(1) > 1
        saved = int(notice.group(1))
        middle = saved + 6
        assert checkpoints(run) == [saved] and middle < STEPS, job.text()[-3000:]
        job.stop(nodes)
        # 2. One node, two loader workers, 6 steps: resumed from the preemption checkpoint.
        out = wait(nodes.submit(config, "job.workers=1", "data.workers=2", f"train.steps={middle}"))
        assert "succeeded" in out, out[-3000:]
        assert f"resumed from {runs_dir(nodes, 0, run)}/checkpoints/step-{saved:07d}" in out
        assert "was written by 2 ranks at ZeRO-2; converting it for 1 ranks" in out
        # 3. Node 1 is back (a new machine, an empty staging folder): two nodes to the end.
        shutil.rmtree(nodes.staging(1))
        nodes.start(1)
        out = wait(nodes.submit(config))
        assert "succeeded" in out and f"at step {middle}" in out, out[-3000:]
        for node in range(2):
            staged = list(nodes.staging(node).rglob(f"universal/step-{middle:07d}/COMPLETE"))
            assert staged, f"node {node} has no universal copy of step {middle}"
    finally:
        nodes.stop()
    assert_every_step_drew_what_it_drew_uninterrupted(tmp_path / "keys", clean_keys)
    assert_same_counts_and_weights(clean, clean_export, run, tmp_path / "export")


def runs_dir(nodes: RayNodes, node: int, run: str) -> Path:
    """The staging folder of `run` on a node."""
    from pipeline import runs

    return nodes.staging(node) / runs.local_dir(run).name


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
