"""The communication module: the only caller of collectives; deadlines that name what they
waited for."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMM_MODULE = ROOT / "pipeline" / "train" / "distributed.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
    "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "new_group", "init_process_group", "destroy_process_group",
}  # fmt: skip
COMM_LIBRARIES = ("torch.distributed", "deepspeed.comm")


def collective_calls(path: Path) -> list[str]:
    """`file:line call` for every torch.distributed / deepspeed.comm collective in a file,
    whatever name the library was imported under."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set(COMM_LIBRARIES)
    found = []
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COMM_LIBRARIES:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in COMM_LIBRARIES:
                    aliases.add(a.asname or a.name)
                elif node.module in COMM_LIBRARIES and a.name in COLLECTIVES:
                    found.append(f"{name}:{node.lineno} import {full}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and receiver in aliases:
                found.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_no_module_but_the_communication_module_calls_a_collective():
    sources = [*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")]
    offenders = [c for p in sources if p != COMM_MODULE for c in collective_calls(p)]
    assert offenders == [], "call these through pipeline.train.distributed.Comm"


def test_the_source_check_sees_every_way_of_calling_a_collective(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from torch import distributed as td
        from deepspeed import comm as ds
        from torch.distributed import all_reduce
        dist.all_reduce(x)
        td.barrier()
        ds.all_gather_object(out, obj)
        torch.distributed.broadcast(x, 0)
        labels.gather(1, index)  # a tensor method, not a collective
        """)
    )
    assert sorted(c.split(" ", 1)[1] for c in collective_calls(sample)) == [
        "dist.all_reduce",
        "ds.all_gather_object",
        "import torch.distributed.all_reduce",
        "td.barrier",
        "torch.distributed.broadcast",
    ]


RANK_SCRIPT = """
import os, sys, time
from pipeline.train import distributed
comm = distributed.setup(timeout_s=float(sys.argv[1]), io_timeout_s=float(sys.argv[2]))
assert comm.device.type == "cpu" and comm.backend == "gloo"
assert comm.any(comm.rank == 1, "the flag") is True
assert comm.sum([comm.rank, 1.0], "counts") == [1.0, 2.0]
assert comm.gather({"rank": comm.rank}, "dicts") == [{"rank": 0}, {"rank": 1}]
case = sys.argv[3]
start = time.monotonic()
try:
    if case == "collective":
        if comm.rank == 0:
            comm.any(True, "the SIGTERM check")  # rank 1 never joins
        else:
            time.sleep(8)
    elif case == "io":
        comm.on_rank_0("uploading step-0000004", lambda: time.sleep(30))
    elif case == "config":
        from pipeline.errors import ConfigError
        def refuse():
            raise ConfigError("checkpoint.staging: memory, but no room")
        comm.on_rank_0("placing the checkpoint folder", refuse)
    elif case.startswith("folders"):  # folders-same / folders-own: each rank's staging folder
        from pathlib import Path
        own = case == "folders-own"
        folder = Path(sys.argv[4]) / (f"node{comm.rank}" if own else "node")
        comm.group_by_folder(folder)
        comm.on_each_node("filling", lambda: (folder / f"by-{comm.rank}").touch())
        comm.barrier("every rank filled")
        print("found", sorted(p.name for p in folder.iterdir()), flush=True)
    print("no error", flush=True)
except Exception as e:
    print(f"rank {comm.rank} after {time.monotonic() - start:.0f}s: {type(e).__name__}: {e}", flush=True)
os._exit(0)
"""


def two_ranks(tmp_path, *args):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
        }  # fmt: skip
        cmd = [sys.executable, str(script), *map(str, args)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return [p.communicate(timeout=120)[0] for p in procs]


@pytest.mark.slow
def test_each_staging_folder_is_filled_once_whatever_the_local_ranks_say(tmp_path):
    """Two ranks with LOCAL_RANK 0 and 1 (one node, as the launcher numbers them): with their
    own folders (Ray's two nodes behind one address) each fills its own; with one folder, one
    rank fills it."""
    own = two_ranks(tmp_path, 60, 60, "folders-own", tmp_path)
    assert "found ['by-0']" in own[0] and "found ['by-1']" in own[1], own
    same = two_ranks(tmp_path, 60, 60, "folders-same", tmp_path)
    assert all("found ['by-0']" in out for out in same), same


@pytest.mark.slow
def test_a_collective_that_a_rank_never_joins_fails_at_its_deadline_naming_it(tmp_path):
    out = two_ranks(tmp_path, 2, 60, "collective")
    assert "CommError" in out[0] and "waiting for the SIGTERM check" in out[0], out
    assert "deadline 2s" in out[0]
    seconds = int(out[0].split(" after ")[1].split("s:")[0])
    assert seconds < 8, out  # gave up at its deadline, before rank 1 woke up


@pytest.mark.slow
def test_a_rank_doing_slow_io_and_the_ranks_waiting_for_it_both_stop_at_the_io_deadline(
    tmp_path,
):
    out = two_ranks(tmp_path, 60, 3, "io")
    for rank, text in enumerate(out):
        assert "uploading step-0000004 on rank 0: not finished after" in text, (rank, out)
        assert "checkpoint.io_timeout_s=3s" in text
        assert int(text.split(" after ")[1].split("s:")[0]) < 20, out


@pytest.mark.slow
def test_a_config_error_in_one_ranks_io_stops_every_rank_as_a_config_error(tmp_path):
    """A node's I/O that finds the config impossible (checkpoint.staging: memory without room)
    stops every rank with a ConfigError (the CLI's exit 2), not a bare OSError."""
    for text in two_ranks(tmp_path, 60, 60, "config"):
        assert (
            "ConfigError: placing the checkpoint folder on rank 0: checkpoint.staging: memory, "
            "but no room" in text
        ), text


@pytest.mark.parametrize(
    ("wanted", "device", "has_bf16", "saved", "chosen"),
    [
        ("auto", "cpu", False, "", "fp32"),  # an AVX2 CPU emulates bf16
        ("auto", "cpu", True, "", "bf16"),
        ("auto", "cuda", True, "", "bf16"),
        ("auto", "cuda", False, "", "fp16"),  # a V100
        ("auto", "cpu", False, "bf16", "bf16"),  # a resume keeps its optimizer state's layout
        ("auto", "cpu", True, "auto", "bf16"),  # a checkpoint from before auto was resolved
        ("bf16", "cpu", False, "", "bf16"),  # asked for: kept (and warned about by the trainer)
        ("fp32", "cuda", True, "bf16", "fp32"),
    ],
)
def test_auto_precision_follows_the_device_and_the_checkpoint_being_resumed(
    monkeypatch, wanted, device, has_bf16, saved, chosen
):
    import torch

    from pipeline.train import distributed

    monkeypatch.setattr(distributed, "native_bf16", lambda d: has_bf16)
    assert distributed.resolve_precision(wanted, torch.device(device), saved)[0] == chosen


def test_native_bf16_on_this_cpu_agrees_with_a_measured_matmul():
    """What oneDNN reports matches what a matmul does: emulated bf16 is several times slower
    than fp32, native bf16 is not."""
    import time

    import torch

    from pipeline.train.distributed import native_bf16

    def seconds(dtype):
        a = torch.randn(256, 256, dtype=dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        return time.perf_counter() - start

    ratio = min(seconds(torch.bfloat16) for _ in range(3)) / min(
        seconds(torch.float32) for _ in range(3)
    )
    assert (ratio < 3) == native_bf16(torch.device("cpu")), ratio
