"""Shared fixtures: a real S3-compatible server on loopback, tiny prepared datasets."""

import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
# The installed `tessera` console script of the environment running the tests (which need not be
# on PATH: `make test` calls .venv/bin/python directly).
TESSERA = str(BIN / "tessera")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_STAGING = pytest.StashKey[str]()
# A pytest worker of `make test` (pytest-xdist) has a core of its own: its tests and the ranks
# they start compute on one thread each, instead of every process spinning up a thread per core.
# The same without workers: tests that compare weights across runs at 1 and 2 ranks need the
# same threads in both (ranks without OMP_NUM_THREADS split the cores, pipeline.train.engine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Remote runs stage checkpoints in memory (checkpoint.staging: auto): the tests' go to a
    folder of this session (each pytest worker's own) in /dev/shm, removed at its end, so ranks
    killed on purpose leave nothing there. Made here, not at import: processes that import this
    module for its helpers are not sessions and would leave an empty folder behind."""
    folder = tempfile.mkdtemp(
        prefix="tessera-tests-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    config.stash[_STAGING] = os.environ["TESSERA_MEMORY_STAGING"] = folder


def pytest_unconfigure(config):
    if folder := config.stash.get(_STAGING, None):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """`make test` runs two pytest workers (pytest-xdist, --dist loadgroup). Tests marked `ray` go
    to one worker, one after another: `ray stop` ends every Ray instance of the machine's user,
    and some read Ray's shared session folder or look for its workers by name."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(gzip.compress(header + array.tobytes()))


def fashion_mnist_subset(folder: Path, train: int, test: int):
    """The first `train` / `test` images of Debian's Fashion-MNIST as IDX files in `folder`;
    returns the full source."""
    from pipeline.data.sources import open_source

    src = open_source(str(FASHION_MNIST))
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = src.arrays[split][:n]
        labels = np.array([r.labels[0] for r in src.splits[split][:n]], dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto_server on 127.0.0.1; the standard AWS_* variables point s3fs at it."""
    port = free_port()
    log = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket: returns "s3://NAME"."""
    import fsspec

    name = f"tessera-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory):
    """scikit-learn digits as a dataset: train 1438 / val 359 samples, 100 per shard."""
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source

    url = str(tmp_path_factory.mktemp("digits") / "ds")
    opts = PrepareOptions(samples_per_shard=100, val_fraction=0.2, executor="local", progress=False)
    prepare(open_source("digits"), url, opts)
    return url
