"""Trust: nothing a checkpoint holds runs as code, whoever wrote it and wherever it came from."""

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TESSERA
from test_train import finish, pretrain, wait, write_config

from pipeline.train import checkpoint
from pipeline.train.engine import refuse_unsafe_pickles


class Planted:
    """Unpickled by a plain torch.load, it creates a file: any code could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(folder: Path, marker: Path) -> Path:
    """The checkpoint's model states replaced by the same dictionary plus a planted object,
    and its digest in COMPLETE updated to match: whoever can write the files can write the
    marker too (digests catch damage, not intent), so only the pickle check stands between."""
    (target,) = folder.glob("*model_states.pt")
    state = torch.load(target, weights_only=False)
    state["extra"] = Planted(marker)
    torch.save(state, target)
    complete = json.loads((folder / checkpoint.COMPLETE).read_text())
    complete["files"][target.name] = checkpoint.digest(target)
    (folder / checkpoint.COMPLETE).write_text(json.dumps(complete))
    return target


def test_the_planted_pickle_does_run_code_when_loaded_plainly(tmp_path):
    """The fixture is real: a plain load creates the file."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": Planted(marker)}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_plain_data_passes_and_a_planted_global_is_named(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"w": torch.zeros(3), "n": 1, "names": ["a"]}, good / "x_model_states.pt")
    (good / checkpoint.COMPLETE).write_text(json.dumps({"files": {}}))
    refuse_unsafe_pickles(good)
    marker = tmp_path / "ran"
    plant(good, marker)
    with pytest.raises(ValueError, match=r"x_model_states.pt: refused.*io.open"):
        refuse_unsafe_pickles(good)
    assert not marker.exists()


@pytest.mark.slow
def test_a_planted_pickle_is_refused_by_export_resume_finetune_and_evaluate(tmp_path, digits_url):
    config = write_config(tmp_path, digits_url, train={"steps": 4})
    finish(pretrain(config))
    run = tmp_path / "run"
    marker = tmp_path / "ran"
    planted = plant(run / "checkpoints" / "step-0000004", marker)
    finetune = write_config(
        tmp_path, digits_url, name="ft.yaml", train={"steps": 4, "output": str(tmp_path / "ft")},
        finetune={"init": str(run)},
    )  # fmt: skip
    commands = {  # resume last: it sets the unreadable checkpoint aside
        "export": ["export", run, tmp_path / "export"],
        "finetune": ["finetune", finetune],
        "evaluate": ["evaluate", config, "--model", run],
        "resume": ["pretrain", config, "--set", "train.steps=8"],
    }
    for name, (command, *args) in commands.items():
        proc = pretrain(args[0], *args[1:], command=command)
        out = wait(proc)
        assert proc.returncode == 2, (name, out[-2000:])
        assert f"{planted}: refused, not plain data (it names io.open)" in out, name
        assert not marker.exists(), f"{name} ran the planted code"
    assert not (tmp_path / "export").exists()
    assert not os.path.exists(run / "checkpoints" / "step-0000008")
    assert list((run / "checkpoints").glob("step-0000004.unreadable-*"))


# -- the checkpoint protocol -------------------------------------------------------------------


def make_complete(root: Path, step: int) -> Path:
    from pipeline.train.checkpoint import COMPLETE, tag

    path = root / tag(step)
    path.mkdir(parents=True)
    (path / "shard.pt").write_text(str(step))
    (path / COMPLETE).write_text("{}")
    return path


def test_the_newest_checkpoint_is_found_and_kept_by_step_number_past_ten_million_steps(
    tmp_path, monkeypatch
):
    import fsspec

    from pipeline import runs

    root = tmp_path / "checkpoints"
    for step in (9_999_998, 9_999_999, 10_000_000):
        make_complete(root, step)
    (root / "step-0000012").mkdir()  # half-written long ago: older by number, newer as text
    (root / checkpoint.LATEST).write_text("step-9999999")  # a kill before `latest` moved
    assert checkpoint.find_latest(root).name == "step-10000000"
    checkpoint._prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step-10000000", "step-9999999"
    ]  # fmt: skip
    # The same on object storage, for finding and for pruning.
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path / "staging"))
    url = f"memory://runs/{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    for step in (9_999_999, 10_000_000):
        name = checkpoint.tag(step)
        fs.pipe(f"{url}/checkpoints/{name}/{checkpoint.COMPLETE}", b"{}")
    assert runs.latest_checkpoint(url) == "step-10000000"
    local = make_complete(runs.local_dir(url) / "checkpoints", 10_000_001)
    (local / checkpoint.STATE).write_text("{}")
    runs.publish_checkpoint(url, local.name, keep_last=2)
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/checkpoints", detail=False))
    assert left == ["latest", "step-10000000", "step-10000001"]


def test_an_object_key_that_would_leave_the_staging_folder_is_refused(tmp_path, monkeypatch):
    import fsspec

    from pipeline import runs

    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path / "staging"))
    url = f"memory://runs/{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/checkpoints/step-0000004/COMPLETE", b"{}")
    fs.pipe(f"{url}/checkpoints/step-0000004/../../../../../escaped", b"x")
    # memory:// normalises `..` itself; an S3 key keeps it, as does this listing
    real_find = fs.find
    monkeypatch.setattr(
        type(fs), "find",
        lambda self, path, detail=False, **kw: {
            **real_find(path, detail=True),
            f"{path}/../../../../../escaped": {"size": 1},
        },
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"escaped would be written outside .*; refused"):
        runs.pull_checkpoint(url, "step-0000004")
    assert not list(tmp_path.rglob("escaped"))


class FakeComm:
    rank, world, folder_leader = 0, 1, True

    def any(self, flag, what=""):
        return flag

    def barrier(self, what=""):
        pass

    def gather(self, obj, what=""):
        return [obj]

    def my_share(self, items):
        return items


class FakeEngine:
    def __init__(self) -> None:
        self.saves = 0

    def save_checkpoint(self, root, tag, save_latest):
        self.saves += 1
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_text(f"save {self.saves}")


def test_a_complete_checkpoint_is_never_written_again(tmp_path):
    """SIGTERM at a checkpoint step saves the same step a second time: a no-op, not a rewrite
    in place of files that COMPLETE and `latest` already vouch for."""

    engine, root = FakeEngine(), tmp_path / "checkpoints"
    pending = checkpoint.write(engine, root, 8, {"step": 8}, FakeComm(), keep_last=2)
    first = checkpoint.finish(pending, FakeComm())
    marker = (first / checkpoint.COMPLETE).read_text()
    again = checkpoint.write(engine, root, 8, {"step": 8, "other": 1}, FakeComm(), keep_last=2)
    assert again is None and engine.saves == 1
    assert (first / "mp_rank_00_model_states.pt").read_text() == "save 1"
    assert (first / checkpoint.COMPLETE).read_text() == marker
    assert json.loads((first / checkpoint.STATE).read_text()) == {"step": 8}


def test_a_checkpoint_finishing_behind_training_hands_its_error_to_the_training_thread():
    behind, gate = checkpoint.Behind(), threading.Event()
    behind.start("step-0000004", gate.wait)
    assert behind.busy and behind.wait(0.05) is False  # still finishing: the caller decides
    gate.set()
    assert behind.wait() is True and not behind.busy

    def fail() -> None:
        raise OSError("upload of step-0000008 refused: 403")

    behind.start("step-0000008", fail)
    with pytest.raises(OSError, match="step-0000008 refused"):
        behind.wait()
    assert behind.wait() is True  # raised once


def test_a_checkpoint_not_finished_by_one_rank_is_never_marked(tmp_path, monkeypatch):
    """A rank that cannot read back what it wrote (a disk error): no marker, no rename, no
    `latest`, and every rank gets the error (it travels in the gather), not a hang."""
    from pipeline.errors import CheckpointNotFinished

    engine, root = FakeEngine(), tmp_path / "checkpoints"
    pending = checkpoint.write(engine, root, 4, {"step": 4}, FakeComm(), keep_last=2)

    def unreadable(path, sync=False):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "digest", unreadable)
    with pytest.raises(CheckpointNotFinished, match="step-0000004 not marked complete: rank 0"):
        checkpoint.finish(pending, FakeComm())
    assert not checkpoint.is_complete(pending.work) and not pending.path.exists()
    assert not (root / checkpoint.LATEST).exists()


def test_transfers_run_side_by_side_and_the_first_error_comes_once_all_are_done():
    from pipeline import runs

    done = []

    def transfer(i: int) -> None:
        time.sleep(0.2)
        if i == 3:
            raise OSError(f"file {i}: connection reset")
        done.append(i)

    started = time.monotonic()
    with pytest.raises(OSError, match="file 3"):
        runs.each(transfer, list(range(8)))
    assert time.monotonic() - started < 0.8  # 8 x 0.2 s one after another would be 1.6 s
    assert sorted(done) == [0, 1, 2, 4, 5, 6, 7]  # the others still finished


# -- the configured endpoint -------------------------------------------------------------------


def test_models_palettes_and_exports_use_the_configured_endpoint_alone(
    s3_endpoint, s3_bucket, monkeypatch
):
    """With the endpoint in the config only (no AWS_ENDPOINT_URL), every read and write goes to
    it; without it they would go to AWS itself, where a bucket of the same name is anyone's."""
    from pipeline.data.palette import Palette
    from pipeline.models import create_model
    from pipeline.models.weights import load_model, read_model_meta, save_model
    from pipeline.train.export import read_weights

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    model = create_model("vit-micro-p4", image_size=16, channels=1, num_classes=10)
    url = f"{s3_bucket}/export"
    save_model(model, url, provenance={"step": 3}, endpoint_url=s3_endpoint)
    assert read_model_meta(url, s3_endpoint)["provenance"] == {"step": 3}
    loaded = load_model(url, s3_endpoint)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert read_weights(url, s3_endpoint).provenance["step"] == 3
    palette = Palette.grey(16)
    palette.save(f"{s3_bucket}/palette.json", s3_endpoint)
    back = Palette.load(f"{s3_bucket}/palette.json", s3_endpoint)
    assert np.array_equal(back.colours, palette.colours)


@pytest.mark.slow
def test_a_run_started_over_in_a_folder_with_newer_checkpoints_is_refused_unless_restarted(
    tmp_path, digits_url
):
    """Without the check, `--resume never` into a longer run's folder pruned the new run's own
    checkpoints as it wrote them (the old run's steps are higher), and the next resume took an
    old one."""
    config = write_config(tmp_path, digits_url, train={"steps": 8})
    finish(pretrain(config))
    ckpts = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    for args in (["--resume", "never"], ["--resume", str(ckpts / "step-0000004")]):
        proc = pretrain(config, *args, "--set", "train.steps=6")
        out = wait(proc)
        assert proc.returncode == 2, out[-2000:]
        assert "holds checkpoints up to step-0000008" in out and "--restart" in out
        assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing touched
    out = finish(pretrain(config, "--resume", "never", "--restart", "--set", "train.steps=6"))
    (aside,) = (tmp_path / "run").glob("checkpoints.before-restart-*")
    assert f"moved {ckpts.resolve()} aside to {aside}" in out
    assert sorted(p.name for p in aside.iterdir()) == before  # kept whole
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000004", "step-0000006"]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path, digits_url):
    """One flipped byte inside a tensor: the file still loads, with a wrong weight. Only the
    digest its COMPLETE marker records tells; export refuses it, resume takes the one before."""
    config = write_config(tmp_path, digits_url, train={"steps": 8})
    finish(pretrain(config))
    ckpts = tmp_path / "run" / "checkpoints"
    marker = json.loads((ckpts / "step-0000008" / "COMPLETE").read_text())
    assert {"trainer.json", "rng-rank00000.json"} <= marker["files"].keys()
    (shard,) = (ckpts / "step-0000008").glob("*rank_0_*optim_states.pt")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # bit rot, a bad disk, a partial overwrite
    shard.write_bytes(data)
    refuse_unsafe_pickles(shard.parent)  # still plain data: the pickle check cannot tell
    export = subprocess.run(
        [TESSERA, "export", str(tmp_path / "run"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 2 and f"{shard}: " in export.stderr, export.stderr[-2000:]
    assert "changed since it was written" in export.stderr
    assert not (tmp_path / "export").exists()

    out = finish(pretrain(config, "--set", "train.steps=12"))
    assert f"warning: cannot resume from step-0000008: {shard}: " in out
    assert f"resumed from {ckpts / 'step-0000004'} at step 4" in out
    (aside,) = ckpts.glob("step-0000008.unreadable-*")
    assert (aside / shard.name).read_bytes() == data  # kept to look at, never deleted
    # step 8 was written again, whole (not skipped as already complete), and pruning kept the
    # set-aside copy
    names = sorted(p.name for p in ckpts.glob("step-*"))
    assert names == ["step-0000008", aside.name, "step-0000012"], names
    checkpoint.verify(ckpts / "step-0000008")


def test_a_torn_file_without_a_recorded_digest_is_still_told_apart(tmp_path):
    """Checkpoints from before markers recorded digests still get the pickle-level check."""
    from pipeline.errors import CorruptCheckpoint

    folder = tmp_path / "step-0000004"
    folder.mkdir()
    torch.save({"w": torch.arange(1000.0)}, folder / "mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text(json.dumps({"step": 4}))
    checkpoint.verify(folder)  # nothing recorded, nothing to compare
    shard = folder / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CorruptCheckpoint, match="cannot be read"):
        refuse_unsafe_pickles(folder)


# -- one writer per run --------------------------------------------------------------------------


def test_a_live_lease_stops_a_second_writer_and_a_released_one_is_taken_at_once(tmp_path):
    from pipeline.errors import RunLeased
    from pipeline.train.lease import Lease

    first, second = (Lease(str(tmp_path), ttl_s=2.0, log=lambda _: None) for _ in range(2))
    first.acquire(poll_s=0.1)
    with pytest.raises(RunLeased, match=f"host .* pid {os.getpid()}"):
        second.acquire(poll_s=0.1)  # first renews every 0.5 s: still alive after 2 * ttl
    assert first.check() == ""
    first.release()
    assert not (tmp_path / "LEASE").exists()
    started = time.monotonic()
    second.acquire(poll_s=0.1)
    assert time.monotonic() - started < 1.0
    second.release()


def test_a_lease_left_by_a_dead_writer_is_taken_after_ttl_elsewhere_and_at_once_here(tmp_path):
    from pipeline.train.lease import Lease, _here

    proc = subprocess.Popen(["true"])  # a pid that existed and has exited
    proc.wait()
    stale = {"holder": "x", **_here(), "pid": proc.pid, "since": 0, "beat": 7}
    (tmp_path / "LEASE").write_text(json.dumps(stale))
    lease, log = Lease(str(tmp_path), ttl_s=3.0, log=print), []
    lease.log = log.append
    started = time.monotonic()
    lease.acquire(poll_s=0.1)  # same machine, same PID namespace, process gone: no wait
    assert time.monotonic() - started < 1.0 and "which is gone" in log[0]
    lease.release()

    elsewhere = {**stale, "machine": "another-boot-id"}  # cannot be asked: wait it out
    (tmp_path / "LEASE").write_text(json.dumps(elsewhere))
    started = time.monotonic()
    lease.acquire(poll_s=0.1)
    assert 3.0 <= time.monotonic() - started < 5.0
    assert json.loads((tmp_path / "LEASE").read_text())["holder"] == lease.me["holder"]
    lease.release()


def test_a_writer_whose_lease_was_taken_over_knows_before_its_next_checkpoint(tmp_path):
    from pipeline.train.lease import Lease

    lease = Lease(str(tmp_path), ttl_s=2.0, log=lambda _: None)
    lease.acquire(poll_s=0.1)
    usurper = {"holder": "y", "host": "node-7", "pid": 4242, "since": time.time()}
    (tmp_path / "LEASE").write_text(json.dumps(usurper))  # it stalled past ttl elsewhere
    deadline = time.monotonic() + 3
    while not lease.check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "now held by host node-7 pid 4242" in lease.check()
    lease.release()
    assert json.loads((tmp_path / "LEASE").read_text())["holder"] == "y"  # not removed


@pytest.fixture(params=["local", "s3"])
def lease_url(request, tmp_path):
    """Where a run's lease lives: a local folder, or a prefix in a bucket (moto)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/run"


def test_a_starter_that_saw_the_lease_free_cannot_take_it_once_it_is_held(lease_url):
    """The race a read-then-write lease loses: two starters read "no lease", both write, and the
    slower one overwrites the first, which then trains on for up to a renewal period. Here the
    write is conditional on what was read, so the stale starter's write is refused; it looks
    again, finds a live writer, and stops."""
    from pipeline.errors import RunLeased
    from pipeline.train.lease import Lease

    first, second = (Lease(lease_url, ttl_s=3.0, log=lambda _: None) for _ in range(2))
    first.acquire(poll_s=0.1)
    real_read, stale = second.slot.read, [(None, None)]  # its first look, taken before `first`
    second.slot.read = lambda: stale.pop() if stale else real_read()
    with pytest.raises(RunLeased, match="is being written by another run"):
        second.acquire(poll_s=0.1)
    assert not stale  # it did act on the stale look
    assert first.check() == ""  # never lost its lease, not even for a moment
    first.release()
    assert first.slot.read() == (None, None)


def test_starters_racing_for_a_free_lease_leave_exactly_one_holder(lease_url):
    import threading

    from pipeline.errors import RunLeased
    from pipeline.train.lease import Lease

    starters = [Lease(lease_url, ttl_s=3.0, log=lambda _: None) for _ in range(6)]
    go, won, refused = threading.Barrier(len(starters)), [], []

    def start(lease: Lease) -> None:
        go.wait()
        try:
            lease.acquire(poll_s=0.05)
            won.append(lease)
        except RunLeased:
            refused.append(lease)

    threads = [threading.Thread(target=start, args=(lease,)) for lease in starters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(refused) == len(starters) - 1
    holder = json.loads(won[0].slot.read()[0])["holder"]
    assert holder == won[0].me["holder"] and won[0].check() == ""
    won[0].release()


@pytest.mark.slow
def test_a_second_run_of_the_same_output_is_stopped_and_the_first_keeps_writing(
    tmp_path, digits_url
):
    """A requeued job while the old one still lives: the second stops before touching the run
    (exit 2, naming the first); the first trains on, saves on SIGTERM and hands the lease back,
    so the next start takes it at once."""
    import signal

    config = write_config(
        tmp_path, digits_url, train={"steps": 100000}, checkpoint={"every_steps": 5, "lease_s": 4}
    )
    first = pretrain(config)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "checkpoints" / "step-0000005").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    second = pretrain(config)
    out = wait(second)
    assert second.returncode == 2, out[-3000:]
    assert "is being written by another run" in out and f"pid {first.pid}" in out
    assert first.poll() is None  # untouched
    os.killpg(first.pid, signal.SIGTERM)
    first_out = wait(first)
    assert first.returncode == 75, first_out[-3000:]
    assert not (tmp_path / "run" / "LEASE").exists()
    third = pretrain(config, "--set", "train.steps=12")
    assert "resumed from" in finish(third)


# -- an unreachable store is not bad data --------------------------------------------------------


def test_retries_go_on_to_the_storage_deadline_and_then_say_the_store_is_down():
    from pipeline.errors import StorageUnavailable
    from pipeline.storage import with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 12:  # more failures than the plain retry count allows
            raise ConnectionResetError("reset by peer")
        return "data"

    assert with_retries("reading s3://b/x.tar", flaky, backoff=0.001, deadline_s=30) == "data"
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"reading s3://b/x.tar: storage unreachable"):
        with_retries("reading s3://b/x.tar", lambda: 1 / 0, backoff=0.01, deadline_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2


@pytest.mark.slow
def test_an_outage_of_the_store_stops_the_run_with_a_checkpoint_and_skips_no_sample(
    tmp_path, digits_url, s3_bucket, s3_endpoint
):
    """The store answers 503 to every read for longer than data.storage_deadline_s: the run
    saves its last whole step and exits 69, naming the shard; nothing is quarantined, and the
    resumed run ends with the weights of a run that never saw the outage, byte for byte."""
    import fsspec
    from faults import FaultProxy
    from safetensors.torch import load_file
    from test_train import run_export

    url = f"{s3_bucket}/digits"
    fsspec.filesystem("s3", skip_instance_cache=True).put(digits_url, url, recursive=True)
    sections = {
        "data": {"url": url, "workers": 2, "storage_deadline_s": 3},
        "train": {"steps": 120},  # two epochs: reads go on long after the first checkpoint
        "checkpoint": {"every_steps": 8, "keep_last": 20},
    }
    (tmp_path / "clean").mkdir()
    (tmp_path / "cut").mkdir()
    finish(pretrain(write_config(tmp_path / "clean", digits_url, **{**sections, "data": {
        **sections["data"], "url": digits_url}})))  # fmt: skip
    with FaultProxy(s3_endpoint, every=10**9) as proxy:
        sections["data"]["endpoint_url"] = proxy.url
        config = write_config(tmp_path / "cut", digits_url, **sections)
        proc = pretrain(config)
        ckpts = tmp_path / "cut" / "run" / "checkpoints"
        deadline = time.monotonic() + 300
        while not (ckpts / "step-0000008" / "COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proxy.outage = True
        out = wait(proc)
        assert proc.returncode == 69, out[-3000:]
        assert "storage unreachable" in out and ".tar" in out and "storage_deadline_s" in out
        stopped = int(re.search(r"stopped at step (\d+)", out).group(1))
        assert 8 <= stopped < 120
        state = json.loads((ckpts / checkpoint.tag(stopped) / "trainer.json").read_text())
        assert state["stream"]["errors"] == 0 and state["stream"]["quarantine"] == []
        proxy.outage = False
        out = finish(pretrain(config))
        assert f"at step {stopped}" in out
    for name in ("clean", "cut"):
        run_export(tmp_path / name / "run", tmp_path / name / "export")
    clean, cut = (
        load_file(tmp_path / n / "export" / "model.safetensors") for n in ("clean", "cut")
    )
    differ = [k for k in clean if clean[k].numpy().tobytes() != cut[k].numpy().tobytes()]
    assert differ == [], differ
