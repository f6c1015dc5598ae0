"""`tessera prepare`: sources to shards, deterministic, resumable, to local paths and S3."""

import json
import random
import subprocess

import fsspec
import numpy as np
import pytest
import torch
from conftest import TESSERA, fashion_mnist_subset
from PIL import Image

from pipeline.data.prepare import PrepareOptions, parse_size, prepare
from pipeline.data.shards import DatasetError, load_manifest
from pipeline.data.sources import FASHION_MNIST_CLASSES, SourceError, open_source
from pipeline.data.stream import Stream, StreamConfig
from pipeline.data.transforms import ImageTransform

LOCAL = PrepareOptions(samples_per_shard=50, executor="local", progress=False)


@pytest.fixture(scope="module")
def fmnist_subset(tmp_path_factory):
    """The first 300 train / 100 test images of Debian's Fashion-MNIST, as IDX files."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    return folder, fashion_mnist_subset(folder, 300, 100)


def test_idx_round_trip_is_pixel_exact(fmnist_subset, tmp_path):
    folder, full = fmnist_subset
    manifest = prepare(open_source(str(folder)), str(tmp_path / "ds"), LOCAL)
    assert manifest.classes == FASHION_MNIST_CLASSES
    assert {k: v.samples for k, v in manifest.splits.items()} == {"train": 300, "test": 100}
    assert manifest.image_size == [28, 28] and manifest.channels == 1
    stream = Stream(StreamConfig(str(tmp_path / "ds"), "test", batch_size=64, train=False))
    for batch in stream.iter_epoch():
        for key, image, label in zip(batch["key"], batch["image"], batch["label"], strict=True):
            i = int(key)
            np.testing.assert_array_equal(image[0].numpy(), full.arrays["test"][i])
            assert label.item() == full.splits["test"][i].labels[0]


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    digits = open_source("digits")
    shas = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        m = prepare(
            digits,
            str(tmp_path / name),
            PrepareOptions(seed=seed, samples_per_shard=200, executor="local", progress=False),
        )
        shas[name] = [s.sha256 for s in m.splits["train"].shards]
    assert shas["a"] == shas["b"]
    assert shas["a"] != shas["c"]


def test_shard_size_target_is_honoured(tmp_path):
    m = prepare(
        open_source("digits"),
        str(tmp_path / "ds"),
        PrepareOptions(shard_bytes=parse_size("200KB"), executor="local", progress=False),
    )
    sizes = [s.bytes for s in m.splits["train"].shards]
    assert len(sizes) > 3 and max(sizes) < 1.2 * 200e3 and np.mean(sizes[:-1]) > 0.7 * 200e3


def make_folder(root, n_per_class=6, corrupt=("cat/bad.png",)):
    for c, value in (("cat", 40), ("dog", 200)):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((12, 12, 3), value + i, dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    for rel in corrupt:
        (root / rel).write_bytes(b"\x89PNG not really")


def test_folder_source_skips_and_records_a_corrupt_image(tmp_path):
    make_folder(tmp_path / "imgs")
    m = prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "ds"), LOCAL)
    assert m.classes == ["cat", "dog"] and m.splits["train"].samples == 12
    assert len(m.skipped) == 1 and "bad.png" in m.skipped[0]["reason"]
    labels = Stream(StreamConfig(str(tmp_path / "ds"), batch_size=4, train=False, image_size=12))
    got = {
        k: int(lab)
        for b in labels.iter_epoch()
        for k, lab in zip(b["key"], b["label"], strict=True)
    }
    assert got == {f"{c}_{i}": label for label, c in enumerate(["cat", "dog"]) for i in range(6)}


def test_jsonl_multi_label_source(tmp_path):
    make_folder(tmp_path / "imgs", corrupt=())
    lines = [
        {"image": "imgs/cat/0.png", "labels": ["cat", "indoor"]},
        {"image": "imgs/dog/1.png", "labels": ["dog"]},
        {"image": str(tmp_path / "imgs/dog/2.png"), "labels": ["dog", "outdoor", "indoor"]},
    ]
    (tmp_path / "jft.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    m = prepare(open_source(str(tmp_path / "jft.jsonl")), str(tmp_path / "ds"), LOCAL)
    assert m.multi_label and m.classes == ["cat", "dog", "indoor", "outdoor"]
    stream = Stream(StreamConfig(str(tmp_path / "ds"), batch_size=3, train=False, image_size=12))
    (batch,) = list(stream.iter_epoch())
    hot = {k: v.tolist() for k, v in zip(batch["key"], batch["label"], strict=True)}
    assert hot == {"000000001": [1, 0, 1, 0], "000000002": [0, 1, 0, 0], "000000003": [0, 1, 1, 1]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"image": "a.png"}', r"jft\.jsonl:1: expected"),
        ('{"image": "a.png", "labels": []}', r"jft\.jsonl:1: 'labels' must be a non-empty list"),
        ('{"image": "a.txt", "labels": [1]}', r"jft\.jsonl:1: 'image' must name an image file"),
    ],
)
def test_bad_jsonl_is_an_error_naming_the_line(tmp_path, text, message):
    (tmp_path / "jft.jsonl").write_text(text)
    with pytest.raises(SourceError, match=message):
        open_source(str(tmp_path / "jft.jsonl"))


def test_unknown_format_and_missing_source_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="unknown source format 'csv'"):
        open_source(str(tmp_path), "csv")
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(str(tmp_path / "absent"))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(SourceError, match="cannot tell the source format"):
        open_source(str(tmp_path / "x.bin"))


class Crashing:
    """Wraps a source; loading record `at` raises a non-source error (a crash, a lost node)."""

    def __init__(self, source, at):
        self.source, self.at = source, at

    def __getattr__(self, name):
        return getattr(self.source, name)

    def load(self, record):
        if record.key == self.at:
            raise RuntimeError("node lost")
        return self.source.load(record)


def test_interrupted_prepare_looks_incomplete_and_resumes_to_the_same_bytes(tmp_path):
    digits = open_source("digits")
    url = str(tmp_path / "ds")
    opts = PrepareOptions(samples_per_shard=200, executor="local", progress=False)
    clean = prepare(digits, str(tmp_path / "clean"), opts)
    from pipeline.data.prepare import plan_splits

    order = plan_splits(digits, opts)["train"]
    with pytest.raises(RuntimeError, match="node lost"):
        prepare(Crashing(digits, order[5 * 200].key), url, opts)
    with pytest.raises(DatasetError, match="did not finish"):
        load_manifest(url)
    written = sorted(p.name for p in (tmp_path / "ds").glob("*.tar"))
    assert written == [f"train-{i:06d}.tar" for i in range(5)]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ds").glob("*.tar")}

    resumed = prepare(digits, url, opts)
    assert [s.sha256 for s in resumed.splits["train"].shards] == [
        s.sha256 for s in clean.splits["train"].shards
    ]
    assert all(
        (tmp_path / "ds" / n).stat().st_mtime_ns == t for n, t in mtimes.items()
    )  # not rewritten
    assert not (tmp_path / "ds" / ".prepare").exists()
    assert prepare(digits, url, opts) == resumed  # complete: re-running changes nothing


def test_resuming_with_another_plan_is_refused(tmp_path):
    digits = open_source("digits")
    opts = PrepareOptions(samples_per_shard=200, executor="local", progress=False)
    from pipeline.data.prepare import plan_splits

    first = plan_splits(digits, opts)["train"][0].key
    with pytest.raises(RuntimeError):
        prepare(Crashing(digits, first), str(tmp_path / "ds"), opts)
    with pytest.raises(DatasetError, match="unfinished prepare of another plan"):
        prepare(
            digits,
            str(tmp_path / "ds"),
            PrepareOptions(seed=5, samples_per_shard=200, executor="local"),
        )


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_with_ray_tasks_matches_in_process(tmp_path):
    digits = open_source("digits")
    local = prepare(
        digits,
        str(tmp_path / "local"),
        PrepareOptions(samples_per_shard=300, executor="local", progress=False),
    )
    ray = prepare(
        digits,
        str(tmp_path / "ray"),
        PrepareOptions(samples_per_shard=300, executor="ray", progress=False),
    )
    assert [s.sha256 for s in ray.splits["train"].shards] == [
        s.sha256 for s in local.splits["train"].shards
    ]


def test_prepare_to_s3_and_stream_every_sample_back(s3_bucket):
    url = f"{s3_bucket}/digits"
    m = prepare(
        open_source("digits"),
        url,
        PrepareOptions(samples_per_shard=250, val_fraction=0.1, executor="local", progress=False),
    )
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert fs.exists(f"{url}/dataset.json") and not fs.exists(f"{url}/.prepare")
    for workers in (0, 2):
        stream = Stream(StreamConfig(url, "train", batch_size=64, train=False, workers=workers))
        keys = [k for b in stream.iter_epoch() for k in b["key"]]
        assert len(keys) == len(set(keys)) == m.splits["train"].samples
        assert stream.cursor.errors == 0


@pytest.mark.slow
def test_cli_prepare_runs_and_reports(tmp_path):
    proc = subprocess.run(
        [TESSERA, "prepare", "digits", str(tmp_path / "ds"), "--local", "--samples-per-shard", "600", "--val-fraction", "0.25"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        "train: 1,347 samples in 3 shards" in proc.stdout  # val: a quarter of each class
        and "val: 450 samples in 1 shards" in proc.stdout
    )
    bad = subprocess.run(
        [TESSERA, "prepare", str(tmp_path / "nothing"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr


def test_palette_is_fitted_at_prepare_and_used_for_tokens(tmp_path):
    from pipeline.data.palette import Palette

    m = prepare(
        open_source("digits"),
        str(tmp_path / "ds"),
        PrepareOptions(samples_per_shard=500, palette_size=16, executor="local", progress=False),
    )
    palette = Palette.load(f"{tmp_path / 'ds'}/{m.palette}")
    assert palette.size == 16 and palette.channels == 1
    stream = Stream(StreamConfig(str(tmp_path / "ds"), batch_size=10, train=False, palette=palette))
    batch = next(iter(stream.iter_epoch()))
    assert batch["tokens"].shape == (10, 64) and batch["tokens"].dtype.is_floating_point is False
    assert batch["tokens"].max() < 16


# -- raw pixels ---------------------------------------------------------------------------------


def test_raw_pixels_stream_the_same_batches_as_their_pngs(fmnist_subset, tmp_path):
    """`--pixels raw` stores the decoded pixels; training batches (crops, flips, palette tokens)
    and evaluation batches are byte for byte those of the same images stored as PNG."""
    from pipeline.data.palette import Palette

    folder, full = fmnist_subset
    png = prepare(open_source(str(folder)), str(tmp_path / "png"), LOCAL)
    raw = prepare(
        open_source(str(folder)), str(tmp_path / "raw"), PrepareOptions(**{**LOCAL.__dict__, "pixels": "raw"})
    )  # fmt: skip
    assert (raw.pixels, raw.image_size, raw.channels) == ("raw", [28, 28], 1)
    assert png.pixels == "encoded"
    per_sample = raw.splits["train"].shards[0].bytes / raw.splits["train"].shards[0].samples
    assert 28 * 28 + 512 < per_sample < 28 * 28 + 4 * 512  # pixels, headers, label, padding
    for kwargs in (
        dict(batch_size=32, image_size=24, seed=3),
        dict(batch_size=32, train=False),
        dict(batch_size=32, palette=Palette.grey(8)),
    ):
        a = list(Stream(StreamConfig(str(tmp_path / "png"), **kwargs)).iter_epoch())
        b = list(Stream(StreamConfig(str(tmp_path / "raw"), **kwargs)).iter_epoch())
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["key"] == y["key"]
            name = "tokens" if "palette" in kwargs else "image"
            assert torch.equal(x[name], y[name]) and torch.equal(x["label"], y["label"])
    first = next(
        iter(Stream(StreamConfig(str(tmp_path / "raw"), "test", 100, train=False)).iter_epoch())
    )
    for key, image in zip(first["key"], first["image"], strict=True):
        np.testing.assert_array_equal(image[0].numpy(), full.arrays["test"][int(key)])


def test_large_raw_pixels_stream_the_same_batches_as_their_pngs(tmp_path):
    """Raw images above transforms.SMALL (here 120x100) are cropped and resized one at a time, as
    a decoded crop is: batches (random crops of colour images, flips, grey, palette tokens) are
    byte for byte those of the same images stored as PNG."""
    from pipeline.data.palette import Palette
    from pipeline.data.transforms import SMALL

    rng = np.random.default_rng(5)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):  # smooth noise: PNG keeps it exactly, and a resize has work to do
            small = rng.integers(0, 256, (25, 30, 3), dtype=np.uint8)
            Image.fromarray(small).resize((120, 100)).save(tmp_path / "imgs" / c / f"{i}.png")
    assert SMALL < 120 * 100
    raw_opts = PrepareOptions(**{**LOCAL.__dict__, "pixels": "raw"})
    raw = prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "raw"), raw_opts)
    prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "png"), LOCAL)
    assert (raw.image_size, raw.channels) == ([100, 120], 3)
    for kwargs in (
        dict(batch_size=8, image_size=48, channels=3, seed=3),  # crops up and down, flips
        dict(batch_size=8, image_size=48, channels=1, seed=1),
        dict(batch_size=8, image_size=32, channels=3, train=False),
        dict(batch_size=8, image_size=16, channels=1, palette=Palette.grey(8)),
    ):
        a = list(Stream(StreamConfig(str(tmp_path / "png"), **kwargs)).iter_epoch())
        b = list(Stream(StreamConfig(str(tmp_path / "raw"), **kwargs)).iter_epoch())
        assert len(a) == len(b) > 0
        name = "tokens" if "palette" in kwargs else "image"
        for x, y in zip(a, b, strict=True):
            assert x["key"] == y["key"] and torch.equal(x[name], y[name])


def test_raw_pixels_of_a_folder_take_its_size_and_refuse_mixed_sizes(tmp_path):
    make_folder(tmp_path / "imgs")  # 12x12 RGB, and one corrupt file
    raw = PrepareOptions(**{**LOCAL.__dict__, "pixels": "raw"})
    m = prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "ds"), raw)
    assert (m.image_size, m.channels, m.splits["train"].samples) == ([12, 12], 3, 12)
    assert len(m.skipped) == 1 and "bad.png" in m.skipped[0]["reason"]
    batch = next(
        iter(Stream(StreamConfig(str(tmp_path / "ds"), batch_size=12, train=False)).iter_epoch())
    )
    assert batch["image"].shape == (12, 3, 12, 12)
    assert {int(batch["image"][i, 0, 0, 0]) for i in range(12)} == {40 + i for i in range(6)} | {
        200 + i for i in range(6)
    }

    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(tmp_path / "imgs" / "dog" / "tall.png")
    with pytest.raises(SourceError, match=r"images of 2 sizes .*12x12, 20x12.*one size"):
        prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "ds2"), raw)
    assert not (tmp_path / "ds2" / "dataset.json").exists()

    # Encoded, the mixed sizes stream; each size is resized in a group of its own, into its rows.
    prepare(open_source(str(tmp_path / "imgs")), str(tmp_path / "ds3"), LOCAL)
    batch = next(
        iter(
            Stream(
                StreamConfig(str(tmp_path / "ds3"), batch_size=13, train=False, image_size=8)
            ).iter_epoch()
        )
    )
    transform = ImageTransform(8, 3, augment=False)
    files = {f"{p.parent.name}_{p.stem}": p for p in (tmp_path / "imgs").rglob("*.png")}
    assert "dog_tall" in batch["key"]
    for key, image in zip(batch["key"], batch["image"], strict=True):
        expected = transform(files[key].read_bytes(), random.Random(0))
        np.testing.assert_array_equal(image.numpy(), expected)


def test_a_raw_sample_of_the_wrong_length_is_quarantined_by_name(tmp_path):
    from pipeline.data.shards import write_tar

    m = prepare(
        open_source("digits"),
        str(tmp_path / "ds"),
        PrepareOptions(**{**LOCAL.__dict__, "pixels": "raw", "samples_per_shard": 2000}),
    )
    shard = tmp_path / "ds" / m.splits["train"].shards[0].name
    samples = [(f"s{i:03d}", {"raw": bytes(64 if i != 7 else 60), "cls": b"1"}) for i in range(200)]
    tar, offsets = write_tar(samples)
    shard.write_bytes(tar)
    (tmp_path / "ds" / m.splits["train"].shards[0].index).write_bytes(
        np.asarray(offsets, "<u8").tobytes()
    )
    from pipeline.data.shards import ShardInfo, SplitInfo

    m.splits["train"] = SplitInfo([ShardInfo(shard.name, 200, len(tar), "")])
    m.save(fsspec.filesystem("file"), str(tmp_path / "ds"))
    stream = Stream(StreamConfig(str(tmp_path / "ds"), batch_size=50, train=False))
    keys = [k for b in stream.iter_epoch() for k in b["key"]]
    assert len(keys) == 199 and "s007" not in keys
    (bad,) = stream.state_dict()["quarantine"]
    assert (
        bad["key"] == "s007" and "raw pixels: 60 bytes" in bad["reason"] and "64" in bad["reason"]
    )
