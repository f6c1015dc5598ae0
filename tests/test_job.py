"""`tessera run`: the stage graph, locally and as a Ray job on a real local Ray head.

The Ray tests start the head (2 CPUs) and an S3 endpoint with infra/dev-services.sh, submit with
launch/ray-submit.sh, and read what a user reads: the job's log, its status, the run folder.
"""

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIN, TESSERA, free_port
from ports import exposed, process_tree, sockets_of
from test_train import finish, launch, wait

from pipeline.config import parse_config
from pipeline.data.shards import DatasetError
from pipeline.errors import ConfigError
from pipeline.orchestrate.job import absolute_paths

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parent.parent
TIMEOUT = 600
# Keys a user might hold in their shell; they must reach S3 and nothing else.
KEY_ID, SECRET = "AKIATESSERAFAKE7Q2Z", "tessera/Fake+Secret/9vLx2WqR"


def job_config(folder: Path, data_url: str, **sections) -> Path:
    cfg = {
        "name": "job",
        "model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1, "num_classes": 10},
        "prepare": [
            {"source": "digits", "output": data_url, "val_fraction": 0.2, "samples_per_shard": 256}
        ],
        "data": {"url": data_url, "workers": 0, "shuffle_buffer": 256, "augment": "none"},
        "train": {"objective": "supervised", "steps": 12, "global_batch_size": 16,
                  "output": "run"},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2, "precision": "auto"},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"every_steps": 4},
        "eval": {"evaluators": ["linear_probe", "knn"], "finetune_steps": 8},
        "job": {"workers": 2, "max_failures": 1},
    }  # fmt: skip
    for name, changes in sections.items():
        cfg[name] = {**cfg.get(name, {}), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STAGE = re.compile(r"^tessera run: \[\d/\d (\w+)\] (?!started)(.*) \(\d+s\)$", re.M)


def stage_notes(out: str) -> dict[str, str]:
    return dict(STAGE.findall(out))


# -- config ---------------------------------------------------------------------------------


def test_job_and_prepare_sections_are_checked_where_they_are_written():
    base = {"model": {"name": "vit-micro-p4", "num_classes": 10}}
    with pytest.raises(ConfigError, match=r"job\.stages: .*in the order"):
        parse_config({**base, "job": {"stages": ["evaluate", "pretrain"]}}, "a.yaml")
    with pytest.raises(ConfigError, match=r"job\.stages\[0\]: got 'train'"):
        parse_config({**base, "job": {"stages": ["train"]}}, "a.yaml")
    with pytest.raises(ConfigError, match=r"prepare\[1\]\.val_fraction: got 1.5"):
        parse_config(
            {**base, "prepare": [{"source": "digits", "output": "a"},
                                 {"source": "digits", "output": "b", "val_fraction": 1.5}]},
            "a.yaml",
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"prepare\[0\]: .*output"):
        parse_config({**base, "prepare": [{"source": "digits"}]}, "a.yaml")


def test_relative_paths_start_at_the_root_and_urls_and_names_are_kept(tmp_path):
    (tmp_path / "images").mkdir()
    raw = {
        "data": {"url": "data/x"}, "train": {"output": "runs/a"},
        "eval": {"target": "s3://bucket/digits"}, "finetune": {"init": "/abs/export"},
        "prepare": [{"source": "digits", "output": "data/x"},
                    {"source": "images", "output": "memory://y"}],
    }  # fmt: skip
    fixed = absolute_paths(raw, str(tmp_path))
    assert fixed["data"]["url"] == str(tmp_path / "data/x")
    assert fixed["train"]["output"] == str(tmp_path / "runs/a")
    assert fixed["eval"]["target"] == "s3://bucket/digits"
    assert fixed["finetune"]["init"] == "/abs/export"
    assert fixed["prepare"][0]["source"] == "digits"  # a source name, not a path here
    assert fixed["prepare"][1] == {"source": str(tmp_path / "images"), "output": "memory://y"}


def test_the_finetune_stage_measures_before_and_after_on_val_and_reads_test_once(
    tmp_path, digits_url
):
    """Choose on validation, report test once: with train/val/test the stage's training and its
    before/after read val, and test is its final report; without test, val is both (labelled)."""
    from conftest import fashion_mnist_subset

    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source
    from pipeline.orchestrate.job import finetune_run
    from pipeline.train.finetune import check_classes

    (tmp_path / "idx").mkdir()
    fashion_mnist_subset(tmp_path / "idx", 60, 20)
    carved = str(tmp_path / "carved")  # train, val (a quarter, by class), test
    prepare(open_source(str(tmp_path / "idx")), carved, PrepareOptions(
        samples_per_shard=50, val_fraction=0.25, executor="local", progress=False))  # fmt: skip
    base = {"model": {"name": "vit-micro-p4", "num_classes": 10},
            "train": {"output": str(tmp_path / "run")}}  # fmt: skip

    ft = finetune_run(parse_config({**base, "data": {"url": carved}}, "a.yaml"))
    assert (ft.data.train_split, ft.data.val_split, ft.finetune.report_split) == (
        "train",
        "val",
        "test",
    )
    check_classes(ft)
    ft = finetune_run(parse_config({**base, "data": {"url": digits_url}}, "a.yaml"))
    assert (ft.data.val_split, ft.finetune.report_split) == ("val", "")

    with pytest.raises(ConfigError, match=r"finetune\.report_split: got 'val'; is read once"):
        parse_config({**base, "finetune": {"report_split": "val"}}, "a.yaml")
    asked = parse_config(
        {**base, "data": {"url": digits_url}, "finetune": {"report_split": "test"}}, "a.yaml"
    )
    with pytest.raises(DatasetError, match=r"no split 'test'; the dataset has train, val"):
        check_classes(asked)  # before any training


def test_a_ray_cluster_without_room_beside_the_ranks_evaluates_checkpoints_after_training(
    digits_url, monkeypatch
):
    """A checkpoint's task queued behind the ranks' resources would wait for the end of training
    anyway, holding what a restarted rank needs: the watcher says so and waits for the end."""
    import ray

    from pipeline.orchestrate.job import CheckpointWatcher

    def config(**job):
        return parse_config({"model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1},
                             "data": {"url": digits_url}, "job": {"workers": 2, **job},
                             "eval": {"evaluators": ["linear_probe"]}}, "a.yaml")  # fmt: skip

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    watcher = CheckpointWatcher(config(), "ray")
    assert watcher.after == (
        "the cluster has 2 CPUs and 0 GPUs; the ranks and the watcher need 3 and 0"
    )
    assert watcher.thread is None and watcher.proc is None  # nothing submitted yet
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})
    watcher = CheckpointWatcher(config(gpus_per_worker=1, eval_cpus=0.5), "ray")  # no GPU left
    assert watcher.after.endswith("the ranks and the watcher need 2.5 and 3")


def test_a_checkpoints_evaluation_task_past_its_deadline_is_cancelled_and_named(
    digits_url, monkeypatch
):
    """The driver's wait on a checkpoint's task has a deadline: past it the task is cancelled
    and the stage fails naming the checkpoint and the setting (Ray's calls stood in for: the
    wait, not Ray, is under test)."""
    import ray

    from pipeline.orchestrate import job

    run = parse_config({"model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1},
                        "data": {"url": digits_url}, "train": {"steps": 8},
                        "job": {"workers": 1, "eval_checkpoint_timeout_s": 90},
                        "eval": {"evaluators": ["linear_probe"]}}, "a.yaml")  # fmt: skip
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})  # no room: no thread
    watcher = job.CheckpointWatcher(run, "ray")
    waited, cancelled = [], []

    class Task:
        def remote(self, raw, name):
            return f"ref-{name}"

    def get(ref, timeout=None):
        waited.append((ref, timeout))
        raise ray.exceptions.GetTimeoutError("hung")

    watcher.task = Task()
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: cancelled.append((ref, force)))
    monkeypatch.setattr(job.runs, "complete_checkpoints", lambda url, endpoint: ["step-0000004"])
    with pytest.raises(job.StageError, match=r"eval_every_checkpoint: the evaluation of "
                       r"step-0000004 ran past job.eval_checkpoint_timeout_s=90s"):  # fmt: skip
        watcher.wait()
    assert waited == [("ref-step-0000004", 90.0)]
    assert cancelled == [("ref-step-0000004", True)]


# -- local executor -------------------------------------------------------------------------


@pytest.mark.slow
def test_local_job_runs_the_stages_then_a_rerun_skips_every_one(tmp_path):
    config = job_config(
        tmp_path, "data/digits", job={"executor": "local", "workers": 2, "max_failures": 0,
                                      "stages": ["prepare", "pretrain", "export", "evaluate"],
                                      "eval_every_checkpoint": True},
        eval={"evaluators": ["linear_probe"]},
    )  # fmt: skip
    out = finish(launch([TESSERA, "run", config, "--root", tmp_path]))
    notes = stage_notes(out)
    assert notes["prepare"].endswith("written (train 1438, val 359)"), out[-3000:]
    # Each checkpoint evaluated on val by a process beside training (keep_last 2 may prune step
    # 4's before the watcher's first look); the final one always.
    done, _, watched = notes["pretrain"].partition("; ")
    assert done == f"done: {tmp_path}/run/checkpoints/step-0000012", notes
    assert re.fullmatch(r"checkpoints of steps (4, )?(8, )?12 evaluated while training", watched)
    assert notes["export"].startswith("done:")
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| vit-micro-p4 | digits | 12 | digits:val | linear_probe | 1 | top1 |" in table
    assert "| vit-micro-p4 (untrained) | - | 0 | digits:val | linear_probe |" in table
    assert table in out  # the job ends by printing the table
    # Pictures a reader opens without TensorBoard: the curves, and the model's attention.
    from PIL import Image

    with Image.open(tmp_path / "run" / "curves.png") as curves:
        assert curves.size == (1280, 320)  # pretraining loss beside the learning rate
        assert len(np.unique(np.asarray(curves.convert("RGB")).reshape(-1, 3), axis=0)) > 2
    with Image.open(tmp_path / "run/images/attention_rollout-step-0000012.png") as rollout:
        assert rollout.size[0] == 2 * rollout.size[1] // 4  # 4 images, each beside its map
    assert f"curves: {tmp_path}/run/curves.png" in out

    again = finish(launch([TESSERA, "run", config, "--root", tmp_path]))
    notes = stage_notes(again)
    assert notes["prepare"] == f"{tmp_path}/data/digits complete"
    assert notes["pretrain"].startswith("skipped:") and notes["export"].startswith("skipped:")
    assert "skipped (rows present); untrained skipped" in notes["evaluate"]
    assert "step 4/12" not in again  # nothing was trained twice


# -- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head (2 CPUs, token auth) and moto, both on loopback; started without any AWS keys
    in their environment, so a job can only reach S3 with the keys its submitter passes."""
    state = tmp_path_factory.mktemp("dev-services")
    ports = {"S3_PORT": free_port(), "RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(),
             "RAY_AGENT_PORT": free_port()}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update({k: str(v) for k, v in ports.items()}, BIN=str(BIN), RAY_CPUS="2",
               TESSERA_DEV_STATE=str(state))  # fmt: skip
    script = str(ROOT / "infra" / "dev-services.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    client = {
        **env, "RAY_ADDRESS": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
        "RAY_AUTH_MODE": "token", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['S3_PORT']}",
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "BIN": str(BIN),
    }  # fmt: skip
    try:
        yield client
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


def submit(env: dict, config: Path, root: Path, *options: str) -> subprocess.Popen:
    private = root / "submit-tmp"  # where ray-submit.sh keeps a credentials file while it waits
    private.mkdir(exist_ok=True)
    env = {**env, "TESSERA_ROOT": str(root), "RAY_SUBMIT_ARGS": " ".join(options),
           "TMPDIR": str(private)}  # fmt: skip
    return subprocess.Popen(
        [str(ROOT / "launch" / "ray-submit.sh"), str(config)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def ray_cli(env: dict, *args: str, timeout: float = TIMEOUT) -> str:
    proc = subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    return proc.stdout + proc.stderr


def wait_for(path: Path, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}: {path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_ray_job_runs_every_stage_on_s3_data_and_no_key_leaks(ray_cluster, tmp_path):
    import fsspec

    env = ray_cluster
    bucket = f"tessera-{uuid.uuid4().hex[:8]}"
    s3 = fsspec.filesystem(
        "s3", key=KEY_ID, secret=SECRET, skip_instance_cache=True,
        client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]},
    )  # fmt: skip
    s3.mkdir(bucket)
    # Half a CPU per rank leaves one for the checkpoints' evaluations beside training.
    config = job_config(tmp_path, f"s3://{bucket}/digits", job={
        "eval_every_checkpoint": True, "cpus_per_worker": 0.5, "eval_cpus": 1})  # fmt: skip
    out = wait(submit(env, config, tmp_path))
    assert "succeeded" in out, out[-5000:]
    notes = stage_notes(out)
    # Each checkpoint a Ray task of its own, scored on val (S3's images) while the ranks trained
    # on (keep_last 2 may prune step 4's before its turn); the final one always.
    watched = re.search(r"checkpoints of steps ((\d+, )*12) evaluated while training$",
                        notes["pretrain"])  # fmt: skip
    assert watched, notes
    tasks = re.findall(r"\(_evaluate_checkpoint pid=\d+[^)]*\)\S* evaluating \S+/step-\d+ "
                       r"\(vit-micro-p4, step (\d+)\) on s3://", out)  # fmt: skip
    seen = [line for line in out.splitlines() if "_evaluate_checkpoint" in line]
    assert ", ".join(tasks) == watched.group(1), seen[:10] or out[-5000:]
    assert notes["prepare"] == f"s3://{bucket}/digits written (train 1438, val 359)"
    assert notes["finetune"] == f"done: {tmp_path}/run/finetune"
    assert "(ray, 2 workers)" in out
    assert "Started training worker group of size 2" in out  # Ray Train ran the ranks
    table = (tmp_path / "run" / "results.md").read_text()
    for row in ("| finetune | - | top1 |", "| knn | 1 | top1 |", "| linear_probe | 1 | top1 |",
                "| pixels | - | top1 |"):  # fmt: skip
        assert f"| vit-micro-p4 | digits | 12 | digits:val {row}" in table, table
    assert "| vit-micro-p4 (untrained) | - | 0 | digits:val | linear_probe |" in table
    assert table.splitlines()[2] in out  # the table is in the job's log
    # The working directory reached Ray without .git: rows name the submitter's commit.
    from pipeline.evaluate.results import read_rows

    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert {r.commit.removesuffix("+dirty") for r in read_rows(tmp_path / "run")} == {head}

    # The keys reached S3 (the cluster itself has none) and went nowhere else.
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
    logs = ray_cli(env, "logs", job_id)
    session = Path("/tmp/ray/session_latest/logs")
    assert any(job_id in p.read_text(errors="ignore") for p in session.glob("job-driver-*"))
    places = [p for p in [*tmp_path.rglob("*"), *session.rglob("*")] if p.is_file()]
    assert len(places) > 50
    for secret in (KEY_ID, SECRET):
        assert secret not in out and secret not in logs
        leaked = [p for p in places if secret.encode() in p.read_bytes()]
        assert not leaked, f"{secret[:4]}... found in {leaked}"
    assert not list((tmp_path / "submit-tmp").iterdir())  # the credentials file is gone


@pytest.mark.slow
def test_ray_worker_killed_resumes_and_a_cancelled_job_resubmitted_skips_done_stages(
    ray_cluster, tmp_path
):
    env = {k: v for k, v in ray_cluster.items() if not k.startswith("AWS_")}
    config = job_config(
        tmp_path, "data/digits", train={"steps": 150}, checkpoint={"every_steps": 50},
        logging={"every_steps": 25}, eval={"evaluators": ["linear_probe"], "finetune_steps": 200},
    )  # fmt: skip
    first = submit(env, config, tmp_path, "--no-wait", "--submission-id", f"a-{tmp_path.name}")
    finish(first)
    job = f"a-{tmp_path.name}"
    ckpts = tmp_path / "run" / "checkpoints"
    wait_for(ckpts / "step-0000050" / "COMPLETE", "first pretraining checkpoint")
    workers = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True,
                             text=True).stdout.split()  # fmt: skip
    assert len(workers) == 2, workers
    # Mid-training on a single-machine cluster: nothing the ranks opened (the rendezvous store
    # that Ray Train's workers meet on included) listens beyond loopback.
    ranks = process_tree({int(w) for w in workers})
    assert any(port for *_, port in sockets_of(ranks)), "no listening socket seen at all"
    assert exposed(ranks) == [], exposed(ranks)
    os.kill(int(workers[1]), signal.SIGKILL)  # one rank dies mid-pretraining

    wait_for(tmp_path / "run" / "export" / "model.json", "export", timeout=TIMEOUT)
    time.sleep(2)  # into the finetune stage
    ray_cli(env, "stop", job)
    status = ray_cli(env, "status", job)
    assert "was stopped" in status, status
    out = ray_cli(env, "logs", job)
    resumed = re.search(r"resumed from \S+step-(\d+) at step (\d+)", out)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) >= 50, out[-5000:]
    assert "pretrain] done" in out and "finetune] done" not in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    curve = events.Scalars("train/loss")
    steps = [e.step for e in curve]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # one curve through the restart
    assert curve[-1].value < curve[0].value

    again = wait(submit(env, config, tmp_path))
    assert "succeeded" in again, again[-5000:]
    notes = stage_notes(again)
    assert notes["prepare"].endswith("complete")
    assert notes["pretrain"] == f"skipped: {ckpts}/step-0000150 is complete"
    assert notes["export"].startswith("skipped:")
    assert notes["finetune"].startswith("done:") and "evaluate" in notes
    assert "step 25/150" not in again


# -- Ray Data ingestion ---------------------------------------------------------------------


@pytest.mark.slow
def test_ray_data_rows_are_the_streams_decoded_samples(digits_url):
    from pipeline.data.ray_ingest import decode_shard
    from pipeline.data.shards import load_manifest
    from pipeline.data.stream import Stream, StreamConfig

    cfg = StreamConfig(digits_url, "val", batch_size=400, train=False, image_size=8)
    manifest = load_manifest(digits_url)
    rows = decode_shard(cfg, manifest)({"shard": 1})
    assert len(rows) == manifest.split("val").shards[1].samples
    stream = next(iter(Stream(cfg).iter_epoch()))  # the whole split, in order
    where = {key: i for i, key in enumerate(stream["key"])}
    for row in rows:
        i = where[row["key"]]
        assert np.array_equal(row["x"], stream["image"][i].numpy())
        assert row["label"] == stream["label"][i]


@pytest.mark.slow
def test_ray_data_ingestion_outside_a_ray_job_is_a_clear_error(tmp_path):
    config = job_config(tmp_path, "data/digits", data={"ingest": "ray-data"},
                        job={"executor": "local"})  # fmt: skip
    proc = launch([TESSERA, "run", config, "--root", tmp_path])
    out = wait(proc)
    assert proc.returncode == 2 and "data.ingest: ray-data streams batches" in out, out[-2000:]


@pytest.mark.slow
def test_ray_job_trains_from_ray_data_across_epochs(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.items() if not k.startswith("AWS_")}
    config = job_config(
        tmp_path, "data/digits", data={"ingest": "ray-data", "shuffle_buffer": 64},
        train={"steps": 120}, checkpoint={"every_steps": 60}, logging={"every_steps": 20},
        # Half a CPU per trainer leaves one of the cluster's two for Ray Data's decode tasks;
        # no room for a checkpoint's evaluation (1.5 CPUs) beside them: evaluated afterwards.
        job={"workers": 2, "cpus_per_worker": 0.5, "stages": ["prepare", "pretrain"],
             "eval_every_checkpoint": True, "eval_cpus": 1.5},
        eval={"evaluators": ["linear_probe"]},
    )  # fmt: skip
    out = wait(submit(env, config, tmp_path))
    assert "succeeded" in out, out[-5000:]
    assert stage_notes(out)["pretrain"].endswith(
        "checkpoints of steps 60, 120 evaluated after training (the cluster has 2 CPUs and 0 "
        "GPUs; the ranks and the watcher need 2.5 and 0)"
    ), out[-3000:]
    tasks = re.findall(r"\(_evaluate_checkpoint pid=\d+[^)]*\)\S* evaluating \S+/step-\d+ "
                       r"\(vit-micro-p4, step (\d+)\)", out)  # fmt: skip
    assert tasks == ["60", "120"], out[-3000:]  # each a Ray task, after the last step
    assert out.index("step 120/120 loss") < out.index("_evaluate_checkpoint pid=")
    steps = [int(s) for s in re.findall(r"step (\d+)/120 loss", out)]
    assert steps == [20, 40, 60, 80, 100, 120], out[-3000:]
    state = json.loads((tmp_path / "run/checkpoints/step-0000120/trainer.json").read_text())
    # 1438 images, 16 per step, equal shares: 89 steps an epoch, so step 120 is in the second.
    assert state["stream"] == {"format": "tessera-ray-data/1", "epoch": 1, "batches": 31}
    assert state["world"] == 2
