"""Run a function over many items as Ray tasks, or in-process, with a progress callback.

On a Ray cluster (`RAY_ADDRESS` set, as inside `ray job submit`, or an explicit address) the
tasks go to the cluster; otherwise a local Ray instance is started for the call and stopped
after it, every port on loopback, without a dashboard (`start_local_ray`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

Executor = Literal["ray", "local"]


def parallel_map(
    fn: Callable[..., Any],
    items: Sequence[Any],
    shared: Any = None,
    executor: Executor = "ray",
    address: str = "",
    on_result: Callable[[int, Any], None] | None = None,
    max_in_flight: int = 0,
) -> list[Any]:
    """[fn(item, shared) for item in items], in that order, with on_result(index, result) called
    as each finishes. `shared` is sent to the cluster once, not once per task."""
    if executor == "local" or not items:
        results = []
        for i, item in enumerate(items):
            results.append(fn(item, shared))
            if on_result:
                on_result(i, results[-1])
        return results
    import ray

    started_here = connect_ray(address)
    try:
        shared_ref = ray.put(shared)
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        limit = max_in_flight or 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < limit:
                pending[task.remote(items[next_item], shared_ref)] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                if on_result:
                    on_result(i, results[i])
        return results
    finally:
        if started_here:
            ray.shutdown()


def connect_ray(address: str = "") -> bool:
    """Joins the cluster at `address` (or RAY_ADDRESS), or starts a Ray instance of this machine
    alone; True if it started one, which the caller shuts down."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    start_local_ray(log_to_driver=True)
    return True


_CLUSTERS = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(**options: Any) -> None:
    """A new Ray instance (never the last `ray start` cluster, which may be gone) with every
    port on 127.0.0.1 and no dashboard.

    `_node_ip_address="127.0.0.1"` alone is not enough: the driver replaces it with the
    machine's external address, and the GCS, raylet, agents and workers listen there or on
    every interface. With Ray's multi-node support off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    read once when Ray is imported, and inherited by the processes it starts) the node keeps
    127.0.0.1. Both are set for the start only, and restored after."""
    import ray
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTERS), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 **options)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTERS, None)
        else:
            os.environ[_CLUSTERS] = saved_env
