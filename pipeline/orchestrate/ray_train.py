"""Ray Train's worker group, with the process group made by Tessera rather than by Ray.

Ray Train's TorchConfig makes the workers' process group before the training function runs, and
torch's TCPStore behind it listens on every interface (::), whatever MASTER_ADDR says: on a
single-machine cluster the rendezvous store was the one port on the network. Here Ray only
agrees on where to meet (rank 0's node address and a free port there) and sets the environment
a launcher would; `distributed.setup` then makes the group as it does under deepspeed or
torchrun: its store on 127.0.0.1 alone when the group is on one loopback node, torch's default
otherwise (nodes must reach it: that is what the cluster's network rules are for).

Imported only inside a Ray job: it imports Ray.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions
import ray.train
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from pipeline.train.distributed import leave

SHUTDOWN_TIMEOUT_S = 30


def _meeting_point() -> tuple[str, int]:
    """Rank 0's node address and a port free there now (Ray Train picks it the same way)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _set_meeting_point(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def set_rank_environment() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK... as torchrun sets them, from Ray Train's context. Called by
    the training function itself, where the context exists in every Ray Train version."""
    context = ray.train.get_context()
    os.environ["RANK"] = str(context.get_world_rank())
    os.environ["WORLD_SIZE"] = str(context.get_world_size())
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    os.environ["NODE_RANK"] = str(context.get_node_rank())


class _Rendezvous(Backend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        addr, port = worker_group.execute_single(0, _meeting_point)
        worker_group.execute(_set_meeting_point, addr=addr, port=port)

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        # As Ray's own backend does: bounded, since a worker may be dead or stuck.
        try:
            ray.get(worker_group.execute_async(leave), timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            print(f"warning: training workers did not leave their process group within "
                  f"{SHUTDOWN_TIMEOUT_S} s", flush=True)  # fmt: skip


@dataclass
class RendezvousConfig(TorchConfig):
    """TorchConfig (its CUDA device selection stays) whose backend makes no process group."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _Rendezvous
