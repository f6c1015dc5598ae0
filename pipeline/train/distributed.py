"""Communication between training ranks: the process groups, and every collective Tessera runs.

No other module calls a `torch.distributed` collective or barrier (tests/test_distributed.py
reads the source to keep it so); DeepSpeed's own collectives stay inside DeepSpeed. The rules,
written for a GPU cluster and tested on CPU ranks over gloo:

- The rank's device is chosen from LOCAL_RANK before the process group exists: NCCL binds its
  communicator to the current device, and without this every rank of a node would use GPU 0.
- Tensors that cross ranks live on the rank's device (an NCCL group rejects CPU tensors).
  Python objects (cursors, error messages) travel pickled over a gloo group of their own.
- Every wait has a deadline and says what it waited for. Collectives time out after
  `train.collective_timeout_s`. Storage I/O (checkpoint downloads, uploads, the universal
  conversion) runs outside collectives on one rank per node, which gives up after
  `checkpoint.io_timeout_s`; the ranks waiting for it wait that long plus a collective's
  deadline, so they hear why. On GPUs a collective that times out aborts the process (NCCL's watchdog), so a
  dead rank ends the job instead of leaving the others waiting.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0  # train.collective_timeout_s
DEFAULT_IO_TIMEOUT_S = 3600.0  # checkpoint.io_timeout_s


class CommError(RuntimeError):
    """A collective failed or timed out: names the rank and what it was waiting for."""


def rank_device(local_rank: int) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a GPU node (as DeepSpeed's engine assumes), else
    the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise CommError(
            f"LOCAL_RANK is {local_rank} but this node shows {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one "
            "rank per visible GPU"
        )
    return torch.device("cuda", local_rank)


def _machine_id() -> str:
    """This machine, as this boot of it (two containers of one name on two hosts differ)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on `device`: a CUDA GPU with bf16 (Ampere on), or a
    CPU whose oneDNN has a bf16 path (AVX-512 and up). An AVX2-only CPU emulates bf16: 0.9 GFLOP/s
    against fp32's 117 on a 2-core AVX2 EPYC, and a training step about 10x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def resolve_precision(wanted: str, device: torch.device, saved: str = "") -> tuple[str, str]:
    """The precision a run trains in, and why. "auto": the one a checkpoint being resumed was
    written in (its optimizer state is laid out for it), else bf16 where `native_bf16`, fp16 on
    an older GPU, fp32 on a CPU without bf16. An explicit choice is kept."""
    if wanted != "auto":
        return wanted, "as configured"
    if saved and saved != "auto":
        return saved, "the checkpoint being resumed was written in it"
    if native_bf16(device):
        return "bf16", f"{device.type} has bf16 matmuls"
    if device.type == "cuda":
        return "fp16", "this GPU has no bf16"
    return "fp32", "this CPU has no bf16 matmuls (AVX2 only: emulated, about 10x slower)"


def _environment() -> tuple[int, int, int]:
    """(rank, world size, local rank); a single process when no launcher set them."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")  # a single process: rank 0 picks a free port
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _loopback_store(rank: int, world: int, timeout: timedelta) -> Any:
    """The rendezvous store, listening on 127.0.0.1 only, when every rank is on this machine
    (MASTER_ADDR is loopback); None otherwise (torch makes it from MASTER_ADDR and MASTER_PORT).

    torch's TCPStore listens on every interface (::) whatever MASTER_ADDR says, which put a
    single-machine job's store on the network. Rank 0 binds the socket to loopback itself and
    hands it to the store. torchrun's agent keeps its own store: left alone."""
    if os.environ.get("MASTER_ADDR") not in ("127.0.0.1", "localhost"):
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    port = int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world, False, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(max(128, 2 * world))
    port = sock.getsockname()[1]
    os.environ["MASTER_PORT"] = str(port)
    return dist.TCPStore("127.0.0.1", port, world, True, timeout, master_listen_fd=sock.detach())


@dataclass
class Comm:
    """This rank's place in the job and the collectives it takes part in."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout_s: float
    io_timeout_s: float
    objects: Any = field(repr=False, default=None)  # gloo group: pickled objects, barriers
    io: Any = field(repr=False, default=None)  # gloo group: waits for another rank's I/O
    # whether on_each_node's work is this rank's: LOCAL_RANK 0 until group_by_folder
    node_leader: bool | None = None
    # the ranks that see this rank's output folder (group_by_folder); this rank alone until then
    folder_peers: list[int] | None = None
    # gloo groups of the background thread (checkpoints finished while training goes on), the
    # twins of `objects` and `io`
    behind_objects: Any = field(repr=False, default=None)
    behind_io: Any = field(repr=False, default=None)
    in_background: bool = False

    @property
    def io_wait_s(self) -> float:
        """How long ranks wait for another's I/O: its deadline, then a collective's."""
        return self.io_timeout_s + self.timeout_s

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def background(self) -> Comm:
        """This Comm for one background thread per rank: its gathers, barriers and I/O waits go
        over gloo groups of their own, with the same deadlines, so they never interleave with
        the training thread's collectives (each group sees its calls in the same order on every
        rank). Tensor collectives (`any`, `sum`) stay the training thread's."""
        return replace(self, objects=self.behind_objects, io=self.behind_io, in_background=True)

    # -- tensors, on the rank's device -----------------------------------------------------

    def any(self, flag: bool, what: str = "a flag") -> bool:
        """True on every rank if it is true on any."""
        assert not self.in_background, f"{what}: a tensor collective off the training thread"
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._call(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return bool(t.item())

    def sum(self, values: list[float], what: str = "sums") -> list[float]:
        """Element-wise sums over ranks, in float64 (exact for counts below 2**53)."""
        assert not self.in_background, f"{what}: a tensor collective off the training thread"
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._call(what, lambda: dist.all_reduce(t))
        return t.tolist()

    def mean(self, value: float, what: str = "a mean") -> float:
        return self.sum([value], what)[0] / self.world

    def average_(self, tensors: list[torch.Tensor], what: str) -> None:
        """Replace each tensor (on the rank's device, the same shapes on every rank) by its mean
        over ranks, in place: one all-reduce of them all, in float32 or wider."""
        assert not self.in_background, f"{what}: a tensor collective off the training thread"
        if self.world == 1 or not tensors:
            return
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        self._call(what, lambda: dist.all_reduce(flat))
        flat /= self.world
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    def sum_differentiable(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum of `t` over ranks, through which autograd flows: backward sums the gradients
        over ranks the same way (synchronised BatchNorm's statistics)."""
        assert not self.in_background, f"{what}: a tensor collective off the training thread"
        if self.world == 1:
            return t
        return _SumOverRanks.apply(t, self, what)

    # -- Python objects and waits, on gloo --------------------------------------------------

    def gather(self, obj: T, what: str = "objects") -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._call(what, lambda: dist.all_gather_object(out, obj, group=self.objects))
        return out

    def barrier(self, what: str) -> None:
        self._call(what, lambda: dist.barrier(group=self.objects))

    def group_by_folder(self, folder: Path) -> None:
        """Make on_each_node mean "once per copy of `folder`" (a node's staging folder): the
        first rank of the ranks that see the same directory (machine, device, inode) does the
        work. LOCAL_RANK alone would be wrong where a launcher numbers ranks by address: Ray
        Train gives two nodes behind one IP local ranks 0 and 1, and the second node's folder
        would never be filled or uploaded."""
        folder.mkdir(parents=True, exist_ok=True)
        st = folder.stat()
        key = f"{_machine_id()}:{st.st_dev}:{st.st_ino}"
        keys = self.gather(key, "which ranks share a staging folder")
        self.node_leader = keys.index(key) == self.rank
        self.folder_peers = [r for r, k in enumerate(keys) if k == key]

    def my_share(self, items: list[T]) -> list[T]:
        """This rank's part of `items` (the same list on every rank that shares the folder),
        split among those ranks: work on a folder's files done once per copy of the folder,
        in parallel."""
        peers = self.folder_peers or [self.rank]
        return items[peers.index(self.rank) :: len(peers)]

    @property
    def folder_leader(self) -> bool:
        """Whether this rank does the work done once per copy of the output folder."""
        return self.local_rank == 0 if self.node_leader is None else self.node_leader

    def on_each_node(self, what: str, fn: Callable[[], Any]) -> None:
        """fn() on each node's first rank while the node's other ranks wait: I/O into a node's
        own staging folder (see group_by_folder)."""
        self._io(what, fn, self.folder_leader)

    def on_rank_0(self, what: str, fn: Callable[[], Any]) -> None:
        """fn() on rank 0 while every other rank waits: I/O into a folder all nodes share."""
        self._io(what, fn, self.rank == 0)

    def _io(self, what: str, fn: Callable[[], Any], mine: bool) -> None:
        """Both sides have the deadline `io_timeout_s`. A failure or timeout anywhere stops
        every rank with the same error, naming the rank and what it was doing, instead of
        leaving the others in a collective."""
        error = self._within_deadline(what, fn) if mine else ("", False)
        errors = [error] * self.world
        self._call(
            what,
            lambda: dist.all_gather_object(errors, error, group=self.io),
            timeout_s=self.io_wait_s,
        )
        failed = [message for message, _ in errors if message]
        if failed:  # a ConfigError stays one (the CLI's exit 2): the config asked the impossible
            config = any(is_config for _, is_config in errors)
            raise (ConfigError if config else OSError)("; ".join(failed))

    def _within_deadline(self, what: str, fn: Callable[[], Any]) -> tuple[str, bool]:
        """fn() in a thread, given io_timeout_s: ("", False) if it succeeded, else what went
        wrong and whether it was a ConfigError. A call past its deadline is left running (a
        blocked read cannot be interrupted); the error ends the job, and with it the thread."""
        outcome: list[BaseException | None] = []

        def target() -> None:
            try:
                fn()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=target, name=f"tessera-io-{what[:30]}", daemon=True)
        thread.start()
        thread.join(self.io_timeout_s)
        if not outcome:
            return (
                f"{what} on rank {self.rank}: not finished after checkpoint.io_timeout_s="
                f"{self.io_timeout_s:g}s",
                False,
            )
        if isinstance(outcome[0], ConfigError):
            return f"{what} on rank {self.rank}: {outcome[0]}", True
        if outcome[0] is not None:
            return f"{what} failed on rank {self.rank}: {outcome[0]!r}", False
        return "", False

    def _call(self, what: str, fn: Callable[[], Any], timeout_s: float | None = None) -> None:
        if self.world == 1:
            fn()  # no peers to wait for; the call still checks devices and types
            return
        try:
            fn()
        except (RuntimeError, ValueError) as e:  # gloo and NCCL errors, timeouts included
            limit = self.timeout_s if timeout_s is None else timeout_s
            raise CommError(
                f"rank {self.rank}/{self.world}: waiting for {what} failed (deadline {limit:g}s; "
                f"a rank may have died or be stuck): {e}"
            ) from e

    def close(self, clean: bool = True) -> None:
        """Leave the process groups. clean=False after a failure: no barrier, the other ranks
        may be gone."""
        if not dist.is_initialized():
            return
        if clean:
            self.barrier("every rank to finish")
        dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: Comm, what: str) -> torch.Tensor:
        ctx.comm, ctx.what = comm, what
        out = t.detach().clone()
        comm._call(what, lambda: dist.all_reduce(out))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        out = grad.detach().clone()
        ctx.comm._call(f"the gradient of {ctx.what}", lambda: dist.all_reduce(out))
        return out, None, None


def leave() -> None:
    """Leave the process group without waiting for anyone, if this process is still in one (a
    Ray Train worker stopped before its Comm was closed)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(timeout_s: float = DEFAULT_TIMEOUT_S, io_timeout_s: float = DEFAULT_IO_TIMEOUT_S) -> Comm:
    """Joins (or starts) the job's process group: NCCL on GPUs, gloo on CPUs, and gloo
    groups beside it for objects and I/O waits (twice: the training thread's and the background
    thread's, `Comm.background`). Rank and world size come from the environment
    (deepspeed, torchrun, Ray Train, SLURM via the launch scripts, or nothing: one process)."""
    if dist.is_initialized():  # made by the caller (a notebook, a framework of its own)
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local_rank = _environment()
    device = rank_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # An NCCL error or timeout tears the process down rather than leaving it blocked.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    options: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        options["device_id"] = device  # the communicator is made now, on this device
    comm = Comm(rank, world, local_rank, device, timeout_s, io_timeout_s)
    if not dist.is_initialized():
        store = _loopback_store(rank, world, options["timeout"])
        if store is not None:
            options["store"] = store
        dist.init_process_group(comm.backend, rank=rank, world_size=world, **options)
    comm.objects = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    comm.io = dist.new_group(backend="gloo", timeout=timedelta(seconds=comm.io_wait_s))
    comm.behind_objects = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    comm.behind_io = dist.new_group(backend="gloo", timeout=timedelta(seconds=comm.io_wait_s))
    return comm
