"""A run folder on object storage: checkpoints complete-or-ignored there too, resumed on a fresh
machine, and the rest of the job (export, evaluate, results) reading and writing it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import fsspec
import pytest
from conftest import TESSERA
from test_job import stage_notes
from test_train import finish, launch, losses, pretrain, wait, write_config

from pipeline import runs
from pipeline.errors import ConfigError
from pipeline.train.checkpoint import COMPLETE, LATEST, STATE


def remote_run(files: dict[str, str]) -> str:
    url = f"memory://runs/{time.monotonic_ns()}"
    fs = fsspec.filesystem("memory")
    for name, text in files.items():
        fs.pipe(f"{url}/checkpoints/{name}", text.encode())
    return url


def test_local_dir_is_the_path_itself_or_one_staging_folder_per_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path))
    assert runs.local_dir("runs/a") == runs.local_dir("file://runs/a")
    a, b = runs.local_dir("s3://bucket/runs/a"), runs.local_dir("s3://bucket/other/a")
    assert a.parent == tmp_path and a.name.startswith("a-") and a != b
    assert runs.local_dir("s3://bucket/runs/a/") == a


def test_only_a_complete_remote_checkpoint_is_found_or_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path))
    url = remote_run({
        "step-0000004/shard.pt": "four", f"step-0000004/{STATE}": "{}",
        f"step-0000004/{COMPLETE}": "{}",
        "step-0000008/shard.pt": "eight (a kill before its marker)", LATEST: "step-0000008",
    })  # fmt: skip
    assert runs.latest_checkpoint(url) == "step-0000004"  # `latest` names an unfinished one
    # A kill after a marker but before `latest` moved: the marker decides.
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/checkpoints/step-0000008/{COMPLETE}", b"{}")
    fs.pipe(f"{url}/checkpoints/{LATEST}", b"step-0000004")
    assert runs.latest_checkpoint(url) == "step-0000008"
    fs.rm(f"{url}/checkpoints/step-0000008/{COMPLETE}")
    local = runs.pull_checkpoint(url, "step-0000004")
    assert sorted(p.name for p in local.iterdir()) == [COMPLETE, "shard.pt", STATE]
    assert (local / "shard.pt").read_text() == "four"
    with pytest.raises(FileNotFoundError, match="step-0000008 is not complete on the remote"):
        runs.pull_checkpoint(url, "step-0000008")
    assert runs.latest_checkpoint(remote_run({})) is None


def test_publishing_writes_the_marker_after_the_shards_and_prunes_old_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path))
    url = remote_run({})
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/checkpoints/latest.tmp-0a1b2c3d", b"step-0000000")  # a writer killed
    for step in (4, 8, 12):
        name = f"step-{step:07d}"
        local = runs.local_dir(url) / "checkpoints" / name
        local.mkdir(parents=True)
        for f, text in (("shard.pt", str(step)), (STATE, "{}"), (COMPLETE, "{}")):
            (local / f).write_text(text)
        runs.push_files(url, local, skip=runs.WRITTEN_LAST)
        assert not fs.exists(f"{url}/checkpoints/{name}/{COMPLETE}")  # shards first
        assert runs.latest_checkpoint(url) in (None, f"step-{step - 4:07d}")
        runs.publish_checkpoint(url, name, keep_last=2)
        assert runs.latest_checkpoint(url) == name
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/checkpoints", detail=False))
    assert names == ["latest", "step-0000008", "step-0000012"]
    runs.prune_local(url, keep="step-0000012")
    assert [p.name for p in (runs.local_dir(url) / "checkpoints").iterdir()] == ["step-0000012"]


def test_checkpoints_staged_in_memory_are_published_through_the_link_and_given_back(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path / "staging"))
    monkeypatch.setenv("TESSERA_MEMORY_STAGING", str(tmp_path / "shm"))
    assert "on disk (" in runs.stage_checkpoints(remote_run({}), "auto", 1e6)  # no such memory
    (tmp_path / "shm").mkdir()
    url = remote_run({})
    folder = runs.local_dir(url) / "checkpoints"
    (folder / "step-0000004").mkdir(parents=True)  # a checkpoint cached on disk by a run before
    (folder / "step-0000004" / "shard.pt").write_text("four")

    said = runs.stage_checkpoints(url, "auto", need_bytes=1e6)
    memory = runs.memory_folder(url)
    assert said.startswith(f"checkpoints staged in memory ({memory}): ") and "GB free" in said
    assert folder.is_symlink() and folder.resolve() == memory.resolve()
    assert (memory / "step-0000004" / "shard.pt").read_text() == "four"  # moved, not lost
    name = "step-0000008"
    (folder / name).mkdir()  # as DeepSpeed writes it, through the link
    for f, text in (("shard.pt", "eight"), (STATE, "{}"), (COMPLETE, "{}")):
        (folder / name / f).write_text(text)
    runs.push_files(url, folder / name, skip=runs.WRITTEN_LAST)
    runs.publish_checkpoint(url, name, keep_last=2)
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(f"{url}/checkpoints/{name}/shard.pt") == b"eight"  # the run's own keys
    runs.prune_local(url, keep=name)
    assert [p.name for p in memory.iterdir()] == [name]

    # Not enough room: auto goes back to disk with what memory held; memory refuses.
    with pytest.raises(ConfigError, match=r"checkpoint.staging: memory, but .* GB free in memory"):
        runs.stage_checkpoints(url, "memory", need_bytes=1e18)
    assert "on disk" in runs.stage_checkpoints(url, "auto", need_bytes=1e18)
    assert not folder.is_symlink() and (folder / name / "shard.pt").read_text() == "eight"
    assert not memory.exists() and not memory.parent.exists()
    runs.stage_checkpoints(url, "memory", need_bytes=1e6)  # and into memory again
    assert (folder / name / "shard.pt").read_text() == "eight" and folder.is_symlink()

    runs.unstage_memory(url)  # the end of the run: to disk, for the job's next stage here
    assert not folder.is_symlink() and (folder / name / "shard.pt").read_text() == "eight"
    assert not any((tmp_path / "shm" / "tessera").iterdir())  # the memory given back
    runs.stage_checkpoints(url, "memory", need_bytes=1e6)
    runs.unstage_memory(url, keep=False)  # after SIGTERM: dropped, the remote holds it
    assert folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())
    assert not any((tmp_path / "shm" / "tessera").iterdir())


def test_memory_staging_reports_when_it_has_no_room_for_the_next_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path / "staging"))
    monkeypatch.setenv("TESSERA_MEMORY_STAGING", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    url = remote_run({})
    runs.stage_checkpoints(url, "disk", 0.0)
    assert runs.memory_short(url, 1e18) == ""  # on disk: nothing to say
    runs.stage_checkpoints(url, "memory", 1e6)
    assert runs.memory_short(url, 1e6) == ""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2e9))
    assert runs.memory_short(url, 2e9) == ""
    assert runs.memory_short(url, 3e9) == (
        f"2.00 GB free in memory ({tmp_path / 'shm'}) for the next checkpoint's 3.00 GB"
    )


@pytest.mark.slow
def test_a_run_whose_memory_staging_fills_up_goes_on_with_its_checkpoints_on_disk(
    tmp_path, digits_url
):
    """Memory is filled by someone else after the first checkpoint: the next save moves the
    staging folder to disk (with the checkpoint memory held) instead of failing the run, and
    every checkpoint is published."""
    url = f"memory://runs/{tmp_path.name}"  # remote: staged, published to this process's memory
    config = write_config(tmp_path, digits_url, train={"output": url})
    script = f"""
import shutil
from pipeline import runs
from pipeline.config import load_config
from pipeline.train.trainer import pretrain

real, url = shutil.disk_usage, {url!r}
def disk_usage(path):  # memory full once it holds a checkpoint
    full = str(path) == str(runs.memory_root().parent)
    full = full and any(runs.memory_folder(url).glob("step-*"))
    return real(path)._replace(free=0) if full else real(path)
shutil.disk_usage = disk_usage
pretrain(load_config({str(config)!r}))
staged = runs.local_dir(url) / "checkpoints"
print("staged", "link" if staged.is_symlink() else "folder", sorted(p.name for p in staged.iterdir()))
print("latest", runs.latest_checkpoint(url))
"""
    env = {**os.environ, "TESSERA_STAGING": str(tmp_path / "staging"),
           "TESSERA_MEMORY_STAGING": str(tmp_path / "shm")}  # fmt: skip
    (tmp_path / "shm").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-3000:]
    assert "checkpoints staged in memory" in said
    assert re.search(
        r"warning: step 8: memory staging is short: 0.00 GB free in memory \(.*\) for the next "
        r"checkpoint's [0-9.]+ GB; checkpoints staged on disk \(.*\) from here",
        said,
    ), said[-3000:]
    staged = re.search(r"staged (\w+) \[(.*)\]", said)
    assert staged and staged[1] == "folder", said[-2000:]  # on disk to the end
    assert [n for n in staged[2].split(", ") if "step-" in n] == ["'step-0000012'"]  # pruned
    assert "latest step-0000012" in said
    assert not any((tmp_path / "shm" / "tessera").iterdir())  # memory given back at the move


@pytest.mark.slow
def test_two_ranks_checkpoint_to_s3_and_resume_there_on_a_fresh_machine(
    tmp_path, digits_url, s3_bucket
):
    run_url = f"{s3_bucket}/runs/vit"
    config = write_config(tmp_path, digits_url, train={"output": run_url})
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    marker = f"{run_url}/checkpoints/step-0000008/{COMPLETE}"

    first = pretrain(config, ranks=2, env={"TESSERA_STAGING": str(tmp_path / "machine-a")})
    deadline = time.monotonic() + 600
    while not s3.exists(marker):
        assert first.poll() is None and time.monotonic() < deadline, wait(first)[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()

    out = finish(pretrain(config, ranks=2, env={"TESSERA_STAGING": str(tmp_path / "machine-b")}))
    assert f"resumed from {tmp_path}/machine-b/vit-" in out and "at step 8" in out, out[-3000:]
    assert sorted(losses(out)) == [9, 10, 11, 12]
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{run_url}/checkpoints"))
    assert names == ["latest", "step-0000008", "step-0000012"]  # keep_last 2, on the remote
    assert s3.cat_file(f"{run_url}/checkpoints/latest").decode() == "step-0000012"
    state = json.loads(s3.cat_file(f"{run_url}/checkpoints/step-0000012/{STATE}"))
    assert state["step"] == 12 and state["world"] == 2
    assert s3.glob(f"{run_url}/tensorboard/events.out.tfevents.*")
    # Staged in memory, moved to disk at the end: the staging folder keeps the newest.
    assert "checkpoints staged in memory" in out, out[-3000:]
    staged = runs.local_dir(run_url).name
    local = tmp_path / "machine-b" / staged / "checkpoints"
    assert not local.is_symlink() and [p.name for p in local.glob("step-*")] == ["step-0000012"]

    # The rest of the job, on a third machine: export and evaluate from and to the remote run.
    job = [TESSERA, "run", config, "--set", "job.stages=[export,evaluate]",
           "--set", "eval.evaluators=[linear_probe]", "--set", "job.untrained_baseline=false"]  # fmt: skip
    done = finish(launch(job, env={"TESSERA_STAGING": str(tmp_path / "machine-c")}))
    assert stage_notes(done)["export"] == (
        f"done: {tmp_path}/machine-c/{staged}/checkpoints/step-0000012 -> {run_url}/export"
    )
    table = s3.cat_file(f"{run_url}/results.md").decode()
    assert "| ds:val | linear_probe | 1 | top1 |" in table and table in done
    assert json.loads(s3.cat_file(f"{run_url}/export/model.json"))["provenance"]["step"] == 12


@pytest.mark.slow
def test_checkpoints_upload_behind_training_and_a_kill_mid_upload_resumes_exactly(
    tmp_path, digits_url, s3_bucket
):
    """Two ranks on one machine, the run on S3, every upload 2 s slow: training goes on while a
    checkpoint uploads; the uploading rank killed mid-upload of step 8 (one file up, no marker)
    leaves step 4 as the newest checkpoint on the remote, and the run resumed on a fresh machine
    ends with the weights of a run that was never interrupted, byte for byte."""
    import re
    from pathlib import Path

    from safetensors.torch import load_file
    from test_train import BIN, _port, run_export

    sections = {"train": {"steps": 12}, "checkpoint": {"every_steps": 4, "keep_last": 3}}
    (tmp_path / "clean").mkdir()
    finish(pretrain(write_config(tmp_path / "clean", digits_url, **sections), ranks=2))
    run_url = f"{s3_bucket}/runs/behind"
    config = write_config(tmp_path, digits_url, train={"steps": 12, "output": run_url},
                          checkpoint=sections["checkpoint"])  # fmt: skip
    launcher = [BIN / "deepspeed", "--num_gpus", 2, "--no_local_rank", "--master_port", _port()]
    script = Path(__file__).with_name("kill_one_rank.py")
    first = launch([*launcher, script, config, "upload", 0, 2],
                   env={"TESSERA_STAGING": str(tmp_path / "machine-a")})  # fmt: skip
    out = wait(first)
    assert first.returncode != 0 and "KILL upload rank 0 mid-upload of step-0000008" in out, out[
        -3000:
    ]
    began, ended = (
        {name: int(k) for name, k in re.findall(rf"UPLOAD {edge} (\S+) after objective call (\d+)", out)}
        for edge in ("begin", "end")
    )  # fmt: skip
    # Training went on while step 4 was published (hashed, then uploaded): at the save of step 4
    # a rank has made 4 objective calls, and a synchronous publish would end there. (Not "during
    # the upload itself": under load steps 5-8 can all run before the upload begins, and step
    # 8's save then waits for it, as it should; ended == began was seen once in CI.)
    assert ended["step-0000004"] > 4 and began["step-0000004"] >= 4, out[-3000:]
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    remote = f"{run_url}/checkpoints"
    assert s3.cat_file(f"{remote}/{LATEST}").decode() == "step-0000004"
    assert s3.exists(f"{remote}/step-0000008") and not s3.exists(
        f"{remote}/step-0000008/{COMPLETE}"
    )

    out = finish(pretrain(config, ranks=2, env={"TESSERA_STAGING": str(tmp_path / "machine-b")}))
    assert "at step 4" in out and sorted(losses(out)) == list(range(5, 13)), out[-3000:]
    run_export(tmp_path / "clean" / "run", tmp_path / "clean" / "export")
    run_export(run_url, tmp_path / "export")
    clean = load_file(tmp_path / "clean" / "export" / "model.safetensors")
    resumed = load_file(tmp_path / "export" / "model.safetensors")
    differ = [k for k in clean if clean[k].numpy().tobytes() != resumed[k].numpy().tobytes()]
    assert clean.keys() == resumed.keys() and differ == [], differ
