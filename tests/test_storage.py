"""Storage: ranged reads survive transient faults and give up on permanent ones at once."""

import pytest

from pipeline.storage import read_range, with_retries


class FlakyFS:
    """cat_file fails `fails` times per distinct range before answering."""

    def __init__(
        self, data: bytes, fails: int, error: type[Exception] = ConnectionResetError
    ) -> None:
        self.data, self.fails, self.error = data, fails, error
        self.attempts: dict[tuple[int, int], int] = {}

    def cat_file(self, path, start, end):
        n = self.attempts.get((start, end), 0)
        self.attempts[(start, end)] = n + 1
        if n < self.fails:
            raise self.error(f"injected failure {n} for {start}-{end}")
        return self.data[start:end]


def test_read_range_retries_each_chunk_and_continues_where_it_stopped(monkeypatch):
    monkeypatch.setattr("pipeline.storage.READ_CHUNK", 100)
    monkeypatch.setattr("pipeline.storage.BACKOFF", 0.0001)
    fs = FlakyFS(bytes(range(256)) * 4, fails=2)
    retries = []
    assert read_range(fs, "x", 10, 1000, on_retry=retries.append) == fs.data[10:1000]
    # 10 chunks of 100 bytes, each failed twice and then read once: no chunk read twice whole.
    assert len(fs.attempts) == 10 and all(n == 3 for n in fs.attempts.values())
    assert len(retries) == 20


def test_read_range_of_a_short_file_returns_what_is_there(monkeypatch):
    monkeypatch.setattr("pipeline.storage.READ_CHUNK", 100)
    fs = FlakyFS(b"x" * 250, fails=0)
    assert read_range(fs, "x", 0, 1000) == b"x" * 250


def test_permanent_errors_are_not_retried():
    fs = FlakyFS(b"abc", fails=5, error=FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        read_range(fs, "x", 0, 3)
    assert sum(fs.attempts.values()) == 1


def test_retries_give_up_with_the_operation_named():
    def always():
        raise TimeoutError("slow")

    with pytest.raises(OSError, match="reading shard-3: still failing after 2 retries"):
        with_retries("reading shard-3", always, retries=2, backoff=0.001)
