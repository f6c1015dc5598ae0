"""The stream: one global order, every rank in step, exactly-once resume, bad input, faults."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.palette import Palette
from pipeline.data.shards import DatasetError, load_manifest, write_tar
from pipeline.data.stream import (
    DataError,
    Phase,
    Stream,
    StreamConfig,
    _BatchSlots,
    merge_states,
)


def cfg(url, **kw):
    base = {"batch_size": 16, "seed": 3, "shuffle_shards": 3, "shuffle_buffer": 64}
    return StreamConfig(url, **(base | kw))


def epoch_batches(stream):
    return [list(b["key"]) for b in stream.iter_epoch()]


def test_a_whole_eval_epoch_is_every_sample_once_in_stored_order(digits_url):
    stream = Stream(cfg(digits_url, split="val", train=False))
    keys = [k for batch in epoch_batches(stream) for k in batch]
    manifest = load_manifest(digits_url)
    assert len(keys) == len(set(keys)) == manifest.splits["val"].samples


def test_training_epoch_drops_only_the_ragged_tail_and_reshuffles_each_epoch(digits_url):
    stream = Stream(cfg(digits_url))
    first, second = [], []
    for batch in stream:
        (first if stream.epoch == 0 else second).extend(batch["key"])
        if len(second) == len(first):
            break
    n = load_manifest(digits_url).splits["train"].samples  # 1438
    assert len(first) == len(set(first)) == n // 16 * 16
    assert first != second and len(set(first) & set(second)) > 0.95 * len(first)


def test_batches_mix_several_shards(digits_url):
    stream = Stream(cfg(digits_url, train=True, augment=False))
    manifest = load_manifest(digits_url)
    shard_of = {}
    import io
    import tarfile

    for shard in manifest.splits["train"].shards:
        data = (Path(digits_url) / shard.name).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for name in tf.getnames():
                shard_of[name.split(".")[0]] = shard.name
    batch = next(iter(stream.iter_epoch()))
    assert len({shard_of[k] for k in batch["key"]}) >= 3


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_batches(digits_url, world):
    for train in (True, False):
        counts = []
        keys = Counter()
        for rank in range(world):
            stream = Stream(cfg(digits_url, train=train), rank, world)
            batches = epoch_batches(stream)
            assert len(batches) == stream.batches_per_epoch
            counts.append(len(batches))
            keys.update(k for b in batches for k in b)
        assert len(set(counts)) == 1
        assert max(keys.values()) == 1  # ranks never share a sample
        if not train:
            assert sum(keys.values()) == load_manifest(digits_url).splits["train"].samples


def test_the_global_order_does_not_depend_on_the_layout():
    """Readers are contiguous chunks of one permutation; the set served is the same for any R."""
    for readers in (1, 2, 5):
        phase = Phase(0, readers, 4, np.array([[0, 103]]), drop_last=False)
        served = np.concatenate([phase.plan(j, seed=1) for j in range(readers)])
        assert sorted(served.tolist()) == list(range(103))


def run_with_restarts(config, rng, max_stop=9):
    """One epoch, killed at random points and restored from the cursor each time."""
    batches, state = [], None
    while True:
        stream = Stream(config)
        if state is not None:
            stream.load_state_dict(state)
            if stream.epoch > 0:  # stopped right after the epoch's last batch
                return batches
        stop = rng.randint(1, max_stop)
        for taken, batch in enumerate(stream.iter_epoch(), 1):
            batches.append(list(batch["key"]))
            if taken == stop:
                break
        else:
            return batches
        state = stream.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_random_points_matches_the_uninterrupted_epoch(digits_url, workers):
    config = cfg(digits_url, workers=workers, batch_size=32)
    uninterrupted = epoch_batches(Stream(config))
    rng = random.Random(workers)
    for _ in range(3 if workers else 10):
        resumed = run_with_restarts(config, rng, max_stop=6 if workers else 9)
        assert resumed == uninterrupted  # same samples, same batches, same order


@pytest.mark.parametrize("resume", ["none", "in step", "out of step", "another layout"])
def test_workers_going_on_across_epochs_serve_what_restarted_ones_would(digits_url, resume):
    """Iterating on, the workers go into the next epoch without a restart; the batches must be
    those of each epoch started afresh, also after a resume mid-epoch: with the workers in step
    (an even number of batches taken), out of step (odd), or from another layout (1 worker)."""
    config = cfg(digits_url, workers=2, batch_size=32)
    expected, state = [], None
    for _ in range(3):  # every epoch from a new stream restored at its start
        stream = Stream(config)
        if state is not None:
            stream.load_state_dict(state)
        expected.append(epoch_batches(stream))
        state = stream.state_dict()
    got = [[], [], [], []]
    stream = Stream(config)
    if resume != "none":
        before = cfg(digits_url, workers=1, batch_size=32) if resume == "another layout" else config
        stream = Stream(before)
        it = iter(stream)
        got[0] = [list(next(it)["key"]) for _ in range(5 if resume == "out of step" else 6)]
        it.close()
        state, stream = stream.state_dict(), Stream(config)
        stream.load_state_dict(state)
    for batch in stream:
        if stream.epoch == 3:
            break
        got[stream.epoch].append(list(batch["key"]))
    if resume == "another layout":  # epoch 0 is dealt out afresh: the same samples, once
        keys = Counter(k for b in got[0] for k in b)
        assert keys == Counter(k for b in expected[0] for k in b) and max(keys.values()) == 1
        assert got[1:3] == expected[1:3]
    else:
        assert got[:3] == expected


def lockstep(streams, steps):
    iters = [iter(s.iter_epoch()) for s in streams]
    out = []
    for _ in range(steps):
        for it in iters:
            out.extend(next(it)["key"])
    return out


@pytest.mark.parametrize("new_world", [1, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_restore_at_another_world_size_loses_and_repeats_nothing(digits_url, new_world, workers):
    config = cfg(digits_url, workers=workers)
    full = Counter(k for r in range(2) for b in epoch_batches(Stream(config, r, 2)) for k in b)
    old = [Stream(config, r, 2) for r in range(2)]
    before = lockstep(old, steps=7)
    state = merge_states([s.state_dict() for s in old])
    after = []
    for rank in range(new_world):
        stream = Stream(config, rank, new_world)
        stream.load_state_dict(state)
        after.extend(k for b in epoch_batches(stream) for k in b)
    assert Counter(before) + Counter(after) == full  # none missing, none twice


def test_restore_across_the_epoch_boundary_at_another_world_size(digits_url):
    config = cfg(digits_url)
    streams = [Stream(config, r, 2) for r in range(2)]
    per_epoch = streams[0].batches_per_epoch
    its = [iter(s) for s in streams]
    for _ in range(per_epoch + 5):  # into epoch 1
        for it in its:
            next(it)
    assert streams[0].epoch == 1
    state = merge_states([s.state_dict() for s in streams])
    one = Stream(config)
    one.load_state_dict(state)
    rest = [k for b in one.iter_epoch() for k in b["key"]]
    assert len(rest) == len(set(rest)) == per_epoch * 2 * 16 - 5 * 2 * 16


def test_a_cursor_for_another_dataset_is_refused(digits_url):
    state = Stream(cfg(digits_url)).state_dict()
    with pytest.raises(DataError, match="another dataset or seed"):
        Stream(cfg(digits_url, seed=4)).load_state_dict(state)


def test_vit_augmentation_and_palette_tokens(digits_url):
    aug = next(iter(Stream(cfg(digits_url, image_size=16, crop_scale=(0.3, 1.0))).iter_epoch()))
    assert aug["image"].shape == (16, 1, 16, 16) and aug["image"].dtype == torch.uint8
    plain = next(iter(Stream(cfg(digits_url, image_size=16, augment=False)).iter_epoch()))
    assert plain["key"] == aug["key"] and not torch.equal(plain["image"], aug["image"])
    tok = next(iter(Stream(cfg(digits_url, palette=Palette.grey(8))).iter_epoch()))
    assert tok["tokens"].shape == (16, 64) and tok["tokens"].dtype == torch.int64
    with pytest.raises(DatasetError, match="3 channels"):
        Stream(cfg(digits_url, palette=Palette.uniform()))


@pytest.mark.parametrize("palette", [None, Palette.grey(8)], ids=["pixels", "tokens"])
def test_worker_processes_deliver_the_samples_the_main_process_makes(digits_url, palette):
    """Workers hand batches over through shared-memory slots they reuse: every sample's pixels
    (or tokens) and label must be the ones made for it in process, epoch after epoch."""
    name = "image" if palette is None else "tokens"

    def samples(workers):
        stream = Stream(cfg(digits_url, workers=workers, image_size=12, palette=palette))
        out = {}
        for batch in stream:
            if stream.epoch == 2:
                return out
            for key, x, label in zip(batch["key"], batch[name], batch["label"], strict=True):
                out[(stream.epoch, key)] = (x.clone(), int(label))

    in_process, workers = samples(0), samples(2)
    both = in_process.keys() & workers.keys()  # the ragged tails dropped differ: 1 vs 2 readers
    assert len(both) > 2700  # of 2 x 1438
    for k in both:
        assert torch.equal(workers[k][0], in_process[k][0]), k
        assert workers[k][1] == in_process[k][1], k


def test_a_stream_left_mid_epoch_by_its_reader_goes_on_where_it_stopped(digits_url, monkeypatch):
    """An iteration left with batches prefetched (in the workers' slots, all of them with as many
    slots as prefetched batches): the next iteration's workers get the slots, and the epoch goes
    on with nothing lost or repeated."""
    monkeypatch.setattr(_BatchSlots, "SLOTS", 2)
    config = cfg(digits_url, workers=2)
    uninterrupted = epoch_batches(Stream(config))
    stream = Stream(config)
    it = stream.iter_epoch()
    first = [list(next(it)["key"]) for _ in range(3)]
    it.close()
    assert first + epoch_batches(stream) == uninterrupted


def test_every_read_after_the_first_is_made_ahead_across_epochs(digits_url, monkeypatch):
    """The stream reads the next shuffle window in a thread while it decodes this one, also the
    first window of the next epoch; batches are those read without read-ahead (the order does
    not depend on it: test_workers_going_on_across_epochs_serve_what_restarted_ones_would)."""
    import threading

    from pipeline.data import stream as stream_module

    reads = []
    fetch = stream_module._Reader.fetch

    def recorded(self, shards, members):
        reads.append((threading.current_thread().name, len(shards)))
        return fetch(self, shards, members)

    monkeypatch.setattr(stream_module._Reader, "fetch", recorded)
    stream = Stream(cfg(digits_url))
    n = load_manifest(digits_url).splits["train"].samples // 16  # batches per epoch
    batches = [list(b["key"]) for b, _ in zip(stream, range(2 * n + 1), strict=False)]
    windows = -(-n * 16 // 64)  # of 64 samples; the last may be short
    assert len(reads) >= 2 * windows + 1  # two epochs and one window of the third, read ahead
    assert reads[0][0] == threading.current_thread().name
    assert all(name.startswith("tessera-read-ahead") for name, _ in reads[1:]), reads
    assert len({k for b in batches[:n] for k in b}) == n * 16


# -- bad input ---------------------------------------------------------------------------------


def png_bytes(value):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def damaged_dataset(tmp_path):
    """Three shards of 40 samples: shard 0 has 2 corrupt images and 1 sample without a label;
    shard 2 is truncated after the manifest was written (its last 10 samples are cut)."""
    from pipeline.data.prepare import index_shards

    root = tmp_path / "ds"
    root.mkdir()
    for s in range(3):
        samples = []
        for i in range(40):
            key = f"s{s}-{i:02d}"
            members = {"png": png_bytes(i), "cls": str(i % 5).encode()}
            if s == 0 and i in (3, 17):
                members["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 9
            if s == 0 and i == 25:
                del members["cls"]
            samples.append((key, members))
        tar, _ = write_tar(samples)
        (root / f"train-{s}.tar").write_bytes(tar)
    index_shards(str(root), log=lambda _: None)
    data = (root / "train-2.tar").read_bytes()
    offsets = np.fromfile(root / "train-2.idx", dtype="<u8")
    (root / "train-2.tar").write_bytes(data[: int(offsets[30]) + 100])
    return str(root)


def test_corrupt_unlabelled_and_truncated_samples_are_counted_and_skipped(damaged_dataset):
    stream = Stream(
        cfg(damaged_dataset, train=False, batch_size=10, image_size=8, max_error_rate=0.2)
    )
    assert any("train-2.tar" in w and "truncated" in w for w in stream.warnings)
    keys = [k for b in stream.iter_epoch() for k in b["key"]]
    reasons = {e["key"]: e["reason"] for e in stream.state_dict()["quarantine"]}
    assert len(keys) == 120 - 13 and not set(keys) & set(reasons)
    assert "undecodable" in reasons["s0-03"] and "undecodable" in reasons["s0-17"]
    assert "no label" in reasons["s0-25"]
    truncated = [k for k, r in reasons.items() if r == "truncated shard"]
    assert len(truncated) == 10 and all(k.startswith("train-2.tar#") for k in truncated)
    assert stream.cursor.errors == 13


def test_a_malformed_tar_header_costs_only_its_own_sample(tmp_path):
    """A checksum field that is not a number (one flipped byte in a header) used to fail the
    whole read of the run of samples around it: 40 good samples quarantined with it."""
    from pipeline.data.prepare import index_shards

    root = tmp_path / "ds"
    root.mkdir()
    samples = [(f"s{i:02d}", {"png": png_bytes(i), "cls": b"1"}) for i in range(40)]
    (root / "train-0.tar").write_bytes(write_tar(samples)[0])
    index_shards(str(root), log=lambda _: None)
    offsets = np.fromfile(root / "train-0.idx", dtype="<u8")
    data = bytearray((root / "train-0.tar").read_bytes())
    at = int(offsets[7]) + 148  # sample 7's first header: its checksum field
    data[at : at + 6] = b"zz\x01zzz"
    (root / "train-0.tar").write_bytes(bytes(data))
    stream = Stream(cfg(str(root), train=False, batch_size=10, image_size=8, max_error_rate=0.5))
    keys = [k for b in stream.iter_epoch() for k in b["key"]]
    assert keys == [f"s{i:02d}" for i in range(40) if i != 7]
    (bad,) = stream.state_dict()["quarantine"]
    assert "bad tar data: malformed tar header field" in bad["reason"], bad


def test_quarantine_travels_in_the_cursor(damaged_dataset):
    config = cfg(damaged_dataset, train=False, batch_size=10, image_size=8, max_error_rate=0.2)
    stream = Stream(config)
    it = iter(stream.iter_epoch())
    for _ in range(5):
        next(it)
    state = stream.state_dict()
    restored = Stream(config)
    restored.load_state_dict(state)
    list(restored.iter_epoch())
    assert len(merge_states([restored.state_dict()])["quarantine"]) == 13


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_twice_on_two_ranks_delivers_every_sample_once(digits_url, workers):
    """Each rank knows only its own readers' positions: after a resume, a rank's copy of the
    other rank's position goes stale, and the next save must not take it (a replay)."""
    config = cfg(digits_url, workers=workers)
    expected = lockstep([Stream(config, r, 2) for r in range(2)], steps=20)
    got, state = [], None
    for steps in (7, 5, 8):  # two resumes
        streams = [Stream(config, r, 2) for r in range(2)]
        for stream in streams:
            if state is not None:
                stream.load_state_dict(state)
        got += lockstep(streams, steps)
        state = merge_states([s.state_dict() for s in streams])
    assert got == expected  # the same samples in the same order, none replayed
    assert state["consumed"] == {str(j): 20 // max(1, workers) for j in range(2 * max(1, workers))}
    assert (state["seen"], state["errors"]) == (20 * 2 * 16, 0)  # counted once, not per rank


def test_quarantine_and_counts_survive_repeated_resumes_on_two_ranks_unduplicated(
    damaged_dataset,
):
    config = cfg(damaged_dataset, train=False, batch_size=5, image_size=8, max_error_rate=0.3)
    clean = [Stream(config, r, 2) for r in range(2)]
    lockstep(clean, steps=12)
    expected = merge_states([s.state_dict() for s in clean])
    state = None
    for steps in (3, 4, 5):
        streams = [Stream(config, r, 2) for r in range(2)]
        for stream in streams:
            if state is not None:
                stream.load_state_dict(state)
        lockstep(streams, steps)
        state = merge_states([s.state_dict() for s in streams])
    assert expected["errors"] > 0
    for key in ("seen", "errors", "retries", "consumed"):
        assert state[key] == expected[key], key
    assert sorted(map(str, state["quarantine"])) == sorted(map(str, expected["quarantine"]))


def test_error_budget_stops_the_run_naming_the_worst_shards(damaged_dataset):
    stream = Stream(
        cfg(damaged_dataset, train=False, batch_size=10, image_size=8, max_error_rate=0.01)
    )
    with pytest.raises(
        DataError,
        match=r"over the 1% budget; worst shards: train-2\.tar \(10\), train-0\.tar \(3\)",
    ):
        list(stream.iter_epoch())


def test_missing_shard_and_missing_dataset_fail_before_any_work(digits_url, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_url, copy)
    (copy / "train-000003.tar").unlink()
    with pytest.raises(DatasetError, match=r"does not match its shards: missing train-000003\.tar"):
        Stream(cfg(str(copy)))
    with pytest.raises(DatasetError, match=r"no dataset\.json: the folder does not exist"):
        Stream(cfg(str(tmp_path / "nothing")))
    with pytest.raises(DatasetError, match="no split 'test'; the dataset has train, val"):
        Stream(cfg(digits_url, split="test"))


def test_a_training_split_smaller_than_a_batch_per_reader_is_refused_not_waited_on(digits_url):
    """The 359 val images at a batch of 100 fill 3 readers but not 4 (2 ranks x 2 workers):
    a training stream drops the ragged tail, so it would yield nothing, epoch after epoch."""
    Stream(cfg(digits_url, split="val", batch_size=100, workers=3))
    with pytest.raises(
        DatasetError,
        match=r"split 'val' has 359 samples, fewer than one batch of 100 for each of its 4 readers",
    ):
        Stream(cfg(digits_url, split="val", batch_size=100, workers=2), rank=1, world=2)
    assert Stream(cfg(digits_url, split="val", batch_size=1000, train=False)).batches_per_epoch == 1


# -- object storage ----------------------------------------------------------------------------


@pytest.mark.slow
def test_storage_faults_between_client_and_server_lose_nothing(s3_bucket, s3_endpoint):
    from faults import FaultProxy

    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source

    url = f"{s3_bucket}/digits"
    prepare(
        open_source("digits"),
        url,
        PrepareOptions(samples_per_shard=150, executor="local", progress=False),
    )
    # Fewer, larger reads: every injected fault costs a backoff sleep in botocore or s3fs.
    config = cfg(url, train=False, shuffle_buffer=256)
    clean = [k for b in Stream(config).iter_epoch() for k in b["key"]]
    with FaultProxy(s3_endpoint, every=5) as proxy:
        stream = Stream(cfg(url, train=False, shuffle_buffer=256, endpoint_url=proxy.url))
        keys = [k for b in stream.iter_epoch() for k in b["key"]]
    assert keys == clean and len(set(keys)) == 1797
    assert stream.cursor.errors == 0
    assert proxy.slow_downs >= 3 and proxy.drops >= 3


def test_run_config_builds_the_stream_it_describes(digits_url, tmp_path):
    from pipeline.config import parse_config
    from pipeline.data.stream import stream_config

    vit = parse_config(
        {
            "model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1},
            "data": {"url": digits_url, "workers": 0},
        }
    )
    batch = next(iter(Stream(stream_config(vit, "train", 8, train=True)).iter_epoch()))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["label"].shape == (8,)

    raw = {
        "model": {"name": "igpt-micro", "image_size": 8, "vocab_size": 16},
        "data": {"url": digits_url, "palette": "grey", "palette_size": 16, "workers": 0},
        "train": {"objective": "igpt-ar"},
    }
    igpt = parse_config(raw)
    batch = next(iter(Stream(stream_config(igpt, "val", 4, train=False)).iter_epoch()))
    assert batch["tokens"].shape == (4, 64) and "label" not in batch
    with pytest.raises(DatasetError, match=r"has 8 colours but model\.vocab_size is 16"):
        stream_config(parse_config(raw, overrides=["data.palette_size=8"]), "val", 4, False)
    with pytest.raises(DatasetError, match="has no fitted palette"):
        stream_config(parse_config(raw, overrides=["data.palette=kmeans"]), "val", 4, False)


@pytest.mark.slow
def test_a_process_that_fails_with_its_loader_workers_running_still_exits(digits_url):
    """The workers ignore SIGTERM (preemption signals the whole tree); multiprocessing's exit
    handler stops them with SIGTERM and waits, so without the SIGKILL before it this hung."""
    import subprocess
    import sys

    script = f"""
from pipeline.data.stream import Stream, StreamConfig
stream = Stream(StreamConfig({digits_url!r}, batch_size=16, workers=2))
batches = iter(stream)
next(batches)
raise SystemExit("failing with the loader open")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "failing with the loader open" in proc.stderr


@pytest.mark.slow
def test_loader_workers_die_with_a_rank_that_is_killed(digits_url):
    """They ignore SIGTERM (preemption), so nothing else would end them: orphans that keep the
    shared memory and wait for slots that no one frees."""
    import subprocess
    import sys
    import time

    script = f"""
import multiprocessing, os, signal
from pipeline.data.stream import Stream, StreamConfig
batches = iter(Stream(StreamConfig({digits_url!r}, batch_size=16, workers=2)))
next(batches)
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    workers = [int(p) for p in proc.stdout.split()]
    assert len(workers) == 2, proc.stderr[-2000:]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in workers if Path(f"/proc/{p}/status").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text()]  # fmt: skip
    assert alive == []


@pytest.mark.ray
def test_ray_data_ingestion_reports_skipped_samples_and_enforces_the_budget(damaged_dataset):
    """Ray Data's decode tasks used to print what they skipped and nothing else: no count in
    the logs, no budget. The shard's first row now carries them to the trainer's input."""
    from types import SimpleNamespace

    from pipeline.data.ray_ingest import RayDataInput, decode_shard
    from pipeline.data.shards import load_manifest

    config = cfg(damaged_dataset, train=False, batch_size=10, image_size=8, max_error_rate=0.1)
    manifest = load_manifest(damaged_dataset)
    rows = decode_shard(config, manifest)({"shard": 0})
    assert len(rows) == 37 and rows[0]["bad"] == 3 and sum(r["bad"] for r in rows) == 3
    reasons = {e["key"]: e["reason"] for e in json.loads(rows[0]["bad_detail"])}
    assert "no label" in reasons["s0-25"] and "undecodable" in reasons["s0-03"]
    rows += [r for shard in (1, 2) for r in decode_shard(config, manifest)({"shard": shard})]

    ingest = object.__new__(RayDataInput)  # its shard of the dataset, without a Ray job
    ingest.cfg, ingest.cursor = config, SimpleNamespace(errors=0, retries=0, seen=0, quarantine=[])
    columns = {k: np.array([r[k] for r in rows]) for k in ("key", "bad", "bad_detail")}
    with pytest.raises(DataError, match=r"13 of 103 samples unreadable .* worst shards: train-2"):
        for start in range(0, len(rows), 10):  # batches of rows, as iter_batches makes them
            ingest._count({k: v[start : start + 10] for k, v in columns.items()})
    assert ingest.cursor.errors == 13
