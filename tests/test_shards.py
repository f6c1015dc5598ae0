"""Shard format: our tars are ordinary WebDataset tars; foreign tars can be indexed and read."""

import io
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from conftest import TESSERA
from PIL import Image

from pipeline.data.prepare import index_shards
from pipeline.data.shards import DatasetError, iter_tar, load_manifest, scan_tar, write_tar
from pipeline.data.stream import Stream, StreamConfig


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_write_tar_offsets_point_at_each_sample_and_bytes_are_deterministic():
    samples = [(f"k{i:03d}", {"png": png(i), "cls": str(i % 3).encode()}) for i in range(20)]
    tar, offsets = write_tar(samples)
    assert write_tar(samples)[0] == tar
    assert len(offsets) == 21
    for i in range(20):
        members = list(iter_tar(tar[offsets[i] : offsets[i + 1]]))
        assert [m[0] for m in members] == [f"k{i:03d}.png", f"k{i:03d}.cls"]
        assert members[1][1] == str(i % 3).encode()


def test_iter_tar_reports_a_cut_member_and_a_corrupt_header():
    tar, offsets = write_tar([("a", {"png": png(1)}), ("b", {"png": png(2)})])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_tar(tar[: offsets[1] + 512 + 10]))  # 10 bytes into the png data
    broken = bytearray(tar)
    broken[offsets[1] + 10] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar(bytes(broken)))


@pytest.mark.slow
def test_prepared_shards_read_with_the_webdataset_library_and_tar(digits_url):
    import webdataset as wds

    manifest = load_manifest(digits_url)
    shard = manifest.splits["train"].shards[0]
    path = f"{digits_url}/{shard.name}"
    listing = subprocess.run(
        ["tar", "-tf", path], check=True, capture_output=True, text=True
    ).stdout.split()
    assert (
        len(listing) == 2 * shard.samples
        and listing[0].endswith(".png")
        and listing[1].endswith(".cls")
    )
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert len(samples) == shard.samples
    first = samples[0]
    assert {"__key__", "png", "cls"} <= set(first)
    assert Image.open(io.BytesIO(first["png"])).size == (8, 8)


@pytest.mark.slow
def test_gnu_tar_shards_with_long_names_are_indexed_and_streamed(tmp_path):
    """Shards made by GNU tar over KEY.png + KEY.cls files, one key longer than ustar allows."""
    data = tmp_path / "ds"
    data.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    keys = [f"img{i:03d}" for i in range(30)] + ["x" * 120]
    for i, key in enumerate(keys):
        (files / f"{key}.png").write_bytes(png(i * 8))
        (files / f"{key}.cls").write_text(str(i % 4))
    names = sorted(p.name for p in files.iterdir())
    for part, chunk in enumerate((names[:30], names[30:])):
        subprocess.run(
            [
                "tar",
                "--format=gnu",
                "-cf",
                str(data / f"train-{part}.tar"),
                "-C",
                str(files),
                *chunk,
            ],
            check=True,
        )
    manifest = index_shards(str(data), log=lambda _: None)
    assert manifest.splits["train"].samples == len(keys)
    stream = Stream(StreamConfig(str(data), batch_size=8, train=False, image_size=8, channels=1))
    got = [k for b in stream.iter_epoch() for k in b["key"]]
    assert sorted(got) == sorted(keys)
    with pytest.raises(DatasetError, match=r"already has a dataset\.json"):
        index_shards(str(data))


def test_scan_tar_of_a_truncated_tar_keeps_the_complete_members(tmp_path):
    tar, offsets = write_tar([(f"s{i}", {"png": png(i), "cls": b"1"}) for i in range(10)])
    cut = tar[: int(offsets[7]) + 512 + 10]  # inside sample 7's png data
    keys, found = scan_tar(io.BytesIO(cut))
    assert keys == [f"s{i}" for i in range(7)]
    np.testing.assert_array_equal(found, offsets[:8])  # sample 6 ends where sample 7 began
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:  # and Python's tarfile agrees on the full one
        assert len(tf.getnames()) == 20


def test_index_verify_names_each_shard_that_differs_from_its_recorded_sha256(tmp_path, digits_url):
    """A prepared dataset verifies; a copy with one flipped byte in one shard and one shard
    gone fails with exit 2, naming both, and the good shards are not blamed."""

    def verify(url):
        return subprocess.run([TESSERA, "index", url, "--verify"], capture_output=True, text=True)

    ok = verify(digits_url)
    assert ok.returncode == 0 and "shards match their size and sha256" in ok.stdout, ok.stderr
    copy = tmp_path / "ds"
    shutil.copytree(digits_url, copy)
    first, second, *_ = sorted(copy.glob("train-*.tar"))
    data = bytearray(first.read_bytes())
    data[len(data) // 3] ^= 0x01
    first.write_bytes(data)
    second.unlink()
    bad = verify(str(copy))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert f"{first}" in bad.stdout and f"{second} (train): missing" in bad.stdout
    assert "2 of" in bad.stderr and bad.stdout.count("verify: ") == 2
