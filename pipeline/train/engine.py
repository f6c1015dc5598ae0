"""The DeepSpeed engine, built from the typed config. The only module that imports deepspeed.

Rank and world size come from the environment (the deepspeed launcher, torchrun, Ray Train, or
nothing: a single process); the trainer never knows who launched it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig, RunConfig
from pipeline.errors import ConfigError
from pipeline.train import distributed
from pipeline.train.distributed import DEFAULT_IO_TIMEOUT_S, DEFAULT_TIMEOUT_S, Comm
from pipeline.train.optim import lr_schedule, param_groups


def use_environment_ninja() -> None:
    """Builds DeepSpeed's ops with this environment's tools, into a folder of its own.

    torch compiles DeepSpeed's ops with the first `ninja` on PATH. A machine with two (pip's in
    the environment, the system's in /usr/bin) rebuilds the ops on every switch between them:
    each version reads the other's build log as out of date, so a shell without the environment
    on PATH and a Ray worker with it took turns recompiling, a minute each time here. So this
    environment's bin folder goes first on PATH when it holds `ninja`. Two environments on one
    machine (two checkouts, a CI run beside a working copy) shared ~/.cache/torch_extensions the
    same way and took turns rebuilding, each waiting on the other's build lock; each environment
    now builds under its own sub-folder (unless TORCH_EXTENSIONS_DIR is set)."""
    from torch.utils.cpp_extension import get_default_build_root

    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root()) / f"env-{env}")
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "ninja").exists():
        return
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bindir]
    os.environ["PATH"] = os.pathsep.join([bindir, *parts])


def clear_stale_build_locks(root: Path | None = None, log=print) -> list[Path]:
    """Removes the lock files of torch extension builds that no process holds.

    DeepSpeed compiles its ops on first use with torch's `FileBaton`: a `lock` file made with
    O_EXCL, removed when the build (or the check that it is up to date) ends. A process killed
    in between, which is what preemption does, leaves the file behind, and every later process
    waits on it forever. A live holder keeps the file open, so a lock that no process on this
    machine has open, twice a second apart, is stale. Cleaners take turns under an flock, so
    none can remove a lock another has just made. Needs /proc (Linux); elsewhere, does nothing.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = root or Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    proc = Path("/proc")

    def locks() -> list[Path]:  # <root>/<name>/lock, or <root>/<python>_<device>/<name>/lock
        return [*root.glob("*/lock"), *root.glob("*/*/lock")]

    if not proc.is_dir() or not locks():
        return []
    import fcntl

    def unheld() -> list[Path]:
        held = set()
        for fd in proc.glob("[0-9]*/fd/*"):
            try:
                held.add(os.readlink(fd))
            except OSError:  # the process ended, or is another user's
                continue
        return [lock for lock in locks() if str(lock.resolve()) not in held]

    with open(root / ".tessera-clean.flock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        stale = unheld()
        if stale:
            time.sleep(1.0)  # a holder between its close() and remove() is releasing
            stale = [lock for lock in unheld() if lock in stale]
        for lock in stale:
            lock.unlink(missing_ok=True)
            log(f"removed {lock}: a DeepSpeed op build lock left by a killed process")
    return stale


def build_ops(log=print) -> list[str]:
    """Compiles (or finds compiled) the DeepSpeed ops runs load: the optimizers' (on the device,
    and on the CPU for offload), on CPU ranks the shared-memory all-reduce; and the loader's
    JPEG crop decoder. Once per
    machine and environment, before a job, instead of in the first start of every rank (minutes
    on a small machine)."""
    from deepspeed.accelerator import get_accelerator

    from pipeline.data import jpeg

    use_environment_ninja()
    clear_stale_build_locks(log=log)
    cpu = get_accelerator().device_name() == "cpu"  # DS_ACCELERATOR=cuda builds without a GPU
    # FusedAdam: the optimizer on the device; CPUAdam: deepspeed.offload_optimizer's step on
    # the CPU; ShareMemComm: the CPU ranks' all-reduce.
    names = ["FusedAdamBuilder", "CPUAdamBuilder"] + (["ShareMemCommBuilder"] if cpu else [])
    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        if not builder.is_compatible(verbose=False):
            log(f"{builder.NAME}: not buildable here, skipped")
            continue
        log(f"{builder.NAME}: compiling, or checking the compiled copy (about a minute when new)")
        start = time.perf_counter()
        builder.load(verbose=False)
        log(f"{builder.NAME}: ready ({time.perf_counter() - start:.0f}s)")
        built.append(builder.NAME)
    try:
        log(f"JPEG crop decoder: ready ({jpeg.build(log_to=log)})")
        built.append("jpeg")
    except (RuntimeError, OSError) as e:  # not fatal: the loader decodes with PIL, slower
        log(f"JPEG crop decoder: not built, JPEGs will decode with PIL: {e}")
    return built


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, io_timeout_s: float = DEFAULT_IO_TIMEOUT_S, log=print
) -> Comm:
    """This rank's communication (pipeline.train.distributed), with DeepSpeed's own layer
    adopting its process group. Starts a one-process group when no launcher set one up."""
    import deepspeed

    use_environment_ninja()
    clear_stale_build_locks(log=log)
    comm = distributed.setup(timeout_s, io_timeout_s)
    deepspeed.init_distributed(dist_backend=comm.backend, verbose=False)
    if comm.device.type == "cpu":
        _unlink_shm_workspace(comm)
        _share_cores(comm, log)
    return comm


def _share_cores(comm: Comm, log=print) -> None:
    """CPU ranks on one machine split its cores: each takes cores / ranks intra-op threads,
    unless OMP_NUM_THREADS says otherwise (Ray sets it to a worker's CPUs). PyTorch's default,
    a thread per core in every rank, made two quickstart ranks on 2 cores train at 180 images/s
    instead of 1400: four spinning threads on two cores. torchrun's answer is one thread a rank;
    this one uses every core when there are fewer ranks than cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    machines = comm.gather(distributed._machine_id(), "which ranks share this machine")
    here = machines.count(machines[comm.rank])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // here)
    torch.set_num_threads(threads)
    if comm.rank == 0:
        log(f"cpu: {here} ranks share this machine's {cores} cores: {threads} threads each")


def _unlink_shm_workspace(comm: Comm) -> None:
    """DeepSpeed's CPU all-reduce gives every rank on one machine a 66 MB file in /dev/shm, which
    it never removes: each run leaks that much RAM until reboot. Once every rank has mapped every
    other's (they wait for each other while starting, then this barrier), the names can go; the
    memory is freed when the last rank exits, even when killed."""
    comm.barrier("every rank to map DeepSpeed's shared-memory all-reduce buffers")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):  # DeepSpeed names the file after them; without them it made none
        return
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{comm.rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def batch_layout(run: RunConfig, world: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for the global batch."""
    global_batch, micro = run.train.global_batch_size, run.deepspeed.micro_batch_size
    micro = micro or global_batch // world
    if micro == 0 or global_batch % (micro * world):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of micro batch {micro} x "
            f"{world} ranks; set deepspeed.micro_batch_size to a divisor of {global_batch // world}"
        )
    return micro, global_batch // (micro * world)


def deepspeed_config(run: RunConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; a user's own file (deepspeed.config_file) is checked
    against it key by key and may add what the typed config does not cover."""
    ds, optim = run.deepspeed, run.optim
    micro, accum = batch_layout(run, world)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Buckets sized from the model's width, as HF's DeepSpeed integration does: the defaults
        # (up to 5e8 elements) are buffers larger than a ViT-B's whole shard. A hierarchical
        # model has no one hidden size: its buckets hold its largest weight (ResNet-50: 2.4M
        # elements, a 3x3 convolution of its last stage; Swin, PVT: their last MLP); tensors under 10x
        # its final width (the norms, the first stage's smallest weights) stay whole.
        if run.model.family in ("resnet", "swin", "pvt"):
            bucket, persist = run.model.largest_weight(), 10 * run.model.final_width
        else:
            bucket, persist = run.model.width**2, 10 * run.model.width
        zero.update(
            reduce_bucket_size=bucket,
            stage3_prefetch_bucket_size=int(0.9 * bucket),
            stage3_param_persistence_threshold=persist,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_batch_size": run.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": optimizer_config(optim),
        "steps_per_print": 1 << 30,
    }
    if optim.name == "sgd":  # torch.optim.SGD, which DeepSpeed's ZeRO has not tested itself
        cfg["zero_allow_untested_optimizer"] = True
    if optim.grad_clip > 0:
        cfg["gradient_clipping"] = optim.grad_clip
    if ds.config_file:
        cfg = _merge_user_config(ds.config_file, cfg)
    return cfg


def optimizer_config(optim: OptimConfig) -> dict[str, Any]:
    """DeepSpeed's optimizer section: its AdamW, or torch.optim.SGD (DeepSpeed builds any
    torch.optim class by name)."""
    if optim.name == "sgd":
        params = {"lr": optim.lr, "momentum": optim.momentum, "nesterov": optim.nesterov,
                  "weight_decay": optim.weight_decay}  # fmt: skip
        return {"type": "SGD", "params": params}
    params = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
              "weight_decay": optim.weight_decay}  # fmt: skip
    return {"type": "AdamW", "params": params}


def _merge_user_config(path: str, ours: dict[str, Any]) -> dict[str, Any]:
    try:
        with open(path) as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed.config_file: cannot read {path}: {e}") from None
    checks = {
        "train_batch_size": ours["train_batch_size"],
        "train_micro_batch_size_per_gpu": ours["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ours["gradient_accumulation_steps"],
    }
    for key, want in checks.items():
        if key in user and user[key] != want:
            raise ConfigError(f"{path}: {key} is {user[key]} but the run config gives {want}")
    stage = user.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != ours["zero_optimization"]["stage"]:
        raise ConfigError(
            f"{path}: zero_optimization.stage is {stage} but deepspeed.zero_stage is "
            f"{ours['zero_optimization']['stage']}"
        )
    for prec in ("bf16", "fp16"):
        if prec in user and bool(user[prec].get("enabled")) != ours[prec]["enabled"]:
            raise ConfigError(f"{path}: {prec}.enabled disagrees with deepspeed.precision")
    return {**ours, **user}


def model_init_context(run: RunConfig, world: int):
    """Where to build the model: under ZeRO-3 inside `deepspeed.zero.Init`, so each rank only
    ever holds its shard of the parameters (iGPT-XL is 27 GB in fp32 before sharding)."""
    import contextlib

    if run.deepspeed.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    remote = "cpu" if run.deepspeed.offload_params else None
    return deepspeed.zero.Init(
        config_dict_or_path=deepspeed_config(run, world), remote_device=remote
    )


def build_engine(
    model: nn.Module, run: RunConfig, world: int, total_steps: int, load_universal: bool = False
):
    """DeepSpeed engine with AdamW (no decay on norms, biases, position embeddings, tokens) and
    the warmup + decay schedule, stepped once per optimizer step. `load_universal`: the
    checkpoint to resume from is in DeepSpeed's universal format (see `to_universal`)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator()
    supported = {"fp16": device.is_fp16_supported(), "bf16": device.is_bf16_supported()}
    if not supported.get(run.deepspeed.precision, True):
        raise ConfigError(
            f"deepspeed.precision: {run.deepspeed.precision} is not supported by DeepSpeed on "
            f"this device ({device.device_name()}); "
            + (
                "fp16 with loss scaling trains on GPUs only; "
                if device.device_name() == "cpu"
                else ""
            )
            + f"choose one of {[p for p, ok in supported.items() if ok] + ['fp32']}"
        )
    schedule = lr_schedule(run.optim, total_steps)
    config = deepspeed_config(run, world)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(
            model, run.optim.weight_decay, run.optim.lr, run.optim.layer_decay
        ),
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    if run.deepspeed.zero_stage == 0 and run.deepspeed.precision == "fp32":
        _skip_non_finite_updates(optimizer)
    return engine, optimizer, scheduler


def _skip_non_finite_updates(optimizer) -> None:
    """DeepSpeed checks the gradients for inf/NaN before every update (and skips it) except with
    fp32 at ZeRO-0, where it calls the plain optimizer. There, do the same: the gradients are
    already all-reduced, so every rank decides alike; the engine reads `overflow` after the step
    (no update, no scheduler step, counted in `was_step_applied`)."""
    update = optimizer.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]  # fmt: skip
        optimizer.overflow = bool(grads) and not bool(
            torch.stack([g.isfinite().all() for g in grads]).all()
        )
        return None if optimizer.overflow else update(*args, **kwargs)

    optimizer.step = checked_step


def replay_cpu_adam_steps(engine) -> None:
    """Make DeepSpeed's CPU Adam kernels hold what an uninterrupted process would, after a
    resume: bit-exact updates from then on.

    The CPU kernels (FusedAdam's CPU build, and DeepSpeedCPUAdam, the optimizer of ZeRO-Offload
    on GPU clusters) keep beta1**t and beta2**t inside the process, multiplied by beta once per
    step; a fresh process resuming at step t gets them from pow(beta, t), which differs in the
    last bits, so every update after a resume differed from the uninterrupted run's (found by
    comparing weights byte for byte). Steps 1..t are replayed on a one-element dummy, which
    costs microseconds a step. The CUDA kernel computes pow(beta, t) at every step: nothing to
    do there."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
    if not steps or not inner.param_groups:
        return
    group = inner.param_groups[0]
    (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
    dummy = [torch.zeros(1) for _ in range(4)]  # gradient, parameter, moments
    if isinstance(inner, DeepSpeedCPUAdam):
        for t in range(1, max(steps) + 1):
            inner.ds_opt_adam.adam_update(inner.opt_id, t, lr, beta1, beta2, eps, 0.0, True, *dummy)
    elif isinstance(inner, FusedAdam) and engine.device.type == "cpu":
        noop = inner._dummy_overflow_buf
        lists = [[d] for d in dummy]
        for t in range(1, max(steps) + 1):
            inner.multi_tensor_adam(
                2048 * 32, noop, lists, lr, beta1, beta2, eps, t, inner.adam_w_mode, 1, 0.0
            )


def checkpoint_globals() -> list[type]:
    """The classes DeepSpeed's checkpoints pickle besides tensors and builtins: the loss scaler
    (also saved by bf16 and fp32 optimizers), the ZeRO stage and bf16's fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refuse_unsafe_pickles(folder) -> None:
    """DeepSpeed opens checkpoint files with torch.load(weights_only=False), which runs any code
    a pickle names. Before it does, every .pt file under `folder` must load as plain data:
    torch.load(weights_only=True) with only `checkpoint_globals` allowed (memory-mapped, so no
    tensor is read). One that does not is refused, naming the file and the global."""
    import pickle
    import re

    from pipeline.errors import CorruptCheckpoint, UnsafeCheckpoint

    with torch.serialization.safe_globals(checkpoint_globals()):
        for path in sorted(Path(folder).rglob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
                refused = isinstance(e, pickle.UnpicklingError) and "Weights only" in str(e)
                if not refused:  # truncated, overwritten, not a checkpoint at all
                    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                    raise CorruptCheckpoint(f"{path}: cannot be read ({first})") from None
                found = re.search(r"GLOBAL (\S+)", str(e))
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                what = f"it names {found.group(1)}" if found else lines[-1][:200]
                raise UnsafeCheckpoint(
                    f"{path}: refused, not plain data ({what}); a checkpoint holds tensors, "
                    "builtins and DeepSpeed's own state classes only. Load it only if you "
                    "trust where it came from, and then with DeepSpeed itself"
                ) from None


def to_universal(checkpoint_dir, out_dir) -> None:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads at any world size
    and ZeRO stage with the optimizer states intact."""
    import subprocess
    import sys

    refuse_unsafe_pickles(checkpoint_dir)

    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", os.fspath(checkpoint_dir), "--output_folder", os.fspath(out_dir),
        "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"converting {checkpoint_dir} to a universal checkpoint failed:\n{proc.stderr[-2000:]}"
        )


def consolidated_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a checkpoint's ZeRO shards, in one process, whatever the
    number of ranks that wrote them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.train.checkpoint import verify

    verify(Path(checkpoint_dir))
    refuse_unsafe_pickles(checkpoint_dir)
    path = os.fspath(checkpoint_dir)
    parent, tag = os.path.dirname(path), os.path.basename(path)
    return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)


def gathered_params(engine):
    """A context in which engine.module's full parameters are present on every rank (ZeRO-3
    keeps only shards otherwise); every rank must enter it together."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def modifiable_params(model: nn.Module, run: RunConfig):
    """A context in which a freshly built model's full parameters may be overwritten (loading
    pretrained weights). Under ZeRO-3 `zero.Init` left each rank only its shard: they are gathered
    and rank 0's values scattered back on exit."""
    import contextlib

    if run.deepspeed.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)
