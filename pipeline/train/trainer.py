"""One trainer for every objective: `tessera pretrain CONFIG`.

    trainer = Trainer(run, resume="auto")   # model, stream, DeepSpeed engine, newest checkpoint
    trainer.train()                         # train_step() until train.steps, checkpointing

Randomness inside a step (stochastic depth, BERT masks) is seeded from (seed, step, micro-batch,
rank), and the data cursor travels in the checkpoint, so a resumed run computes the same losses
as one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline import runs
from pipeline.config import RunConfig, config_to_raw
from pipeline.data.shards import DatasetError, load_manifest
from pipeline.data.stream import Stream, stream_config
from pipeline.data.transforms import model_input
from pipeline.errors import (
    ConfigError,
    CorruptCheckpoint,
    Preempted,
    RunLeased,
    StorageUnavailable,
    UnsafeCheckpoint,
)
from pipeline.models import create_model, load_pretrained
from pipeline.train import checkpoint
from pipeline.train.distributed import Comm, native_bf16, resolve_precision
from pipeline.train.engine import (
    batch_layout,
    build_engine,
    gathered_params,
    init_distributed,
    model_init_context,
    modifiable_params,
    refuse_unsafe_pickles,
    replay_cpu_adam_steps,
    to_universal,
)
from pipeline.train.export import Weights, read_weights, read_weights_for
from pipeline.train.lease import Lease
from pipeline.train.objectives import OBJECTIVE_METRICS, OBJECTIVES
from pipeline.train.visuals import completion_panel, rollout_panel, save_panel

MAX_NONFINITE_IN_A_ROW = 5
CLOSE_WAIT_S = 10.0  # for a checkpoint still finishing when a failed run closes


class NonFiniteError(RuntimeError):
    pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def measure_peak_flops(
    dtype: torch.dtype, device: torch.device, seconds: float = 0.5, n: int = 0
) -> float:
    """The matmul roof of this device in FLOP/s: n x n matmuls of the training dtype (n=0: 1024
    on a CPU, 8192 on a GPU)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def pretrain(
    run: RunConfig,
    resume: str = "auto",
    log=print,
    drain_notice: DrainNotice | None = None,
    restart: bool = False,
) -> None:
    """`tessera pretrain` on this rank: train to the end, then leave the process group; after a
    failure, without waiting for ranks that may be gone. Raises Preempted after SIGTERM, once
    the checkpoint is saved. `drain_notice`: see Trainer."""
    trainer = Trainer(run, resume=resume, log=log, drain_notice=drain_notice, restart=restart)
    try:
        outcome = trainer.train()
    except BaseException:
        trainer.close(clean=False)
        raise
    trainer.close()
    if outcome == "preempted":
        raise Preempted(
            f"stopped by SIGTERM at step {trainer.step}, checkpoint saved; resume "
            "with the same command"
        )


# The platform's notice that a node of this run is about to go (Ray's drain before a spot
# reclaim): "" while none, else what is happening. Called by every rank at every step.
DrainNotice = Callable[[], str]


class TrainingInput(Protocol):
    """What the trainer reads batches from: the exactly-once `Stream`, or Ray Data's shard."""

    cursor: Any  # .errors and .retries are logged

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]: ...


class Trainer:
    """Built in the order a run needs its parts, each step its own method:
    communication -> run folder and the checkpoint to resume -> input -> model and engine ->
    restored state -> logs.

    Stopping early: SIGTERM (where this runs on the main thread) saves a checkpoint and ends
    training ("preempted"); `drain_notice` (Ray Train's workers, off the main thread, where Ray
    stops the process itself) saves one checkpoint as soon as a node is announced to go and
    trains on: Ray restarts the group from that checkpoint when the node is gone."""

    def __init__(
        self,
        run: RunConfig,
        resume: str = "auto",
        log=print,
        drain_notice: DrainNotice | None = None,
        restart: bool = False,
    ) -> None:
        self.run, self.log = run, log
        self.drain_notice, self._drain_saved = drain_notice, False
        self.comm = init_distributed(
            run.train.collective_timeout_s, run.checkpoint.io_timeout_s, log=log
        )
        self.micro, self.accum = batch_layout(run, self.comm.world)
        self.step, self.skipped = 0, 0
        self._stop = False
        self._visual: dict[str, torch.Tensor] | None = None  # a few fixed samples for pictures
        self.init_provenance: dict[str, Any] = {}  # where finetune.init's weights came from
        self.behind = checkpoint.Behind()  # the checkpoint finishing behind training
        self.blocked_s = 0.0  # training thread's time in checkpoints (save and final wait)
        self.blocked_at: dict[int, float] = {}  # the same, by the step it stood at
        self._setup_output()
        self._take_lease()
        try:
            self._place_checkpoints()
            start = self._checkpoint_to_resume(resume, restart)
            self.stream = self._build_input()
            universal = start is not None and self._prepare_universal(start)
            init = self._finetune_init() if start is None else None  # a resumed run has weights
            self._choose_precision(start)
            self._build_engine(init, universal)
            if start is not None:
                self._resume(start, universal)
            self.writer = self._build_writer()
            self.val_writer = None  # tensorboard/validation: a run of its own beside training
            if run.train.validate_every_steps:
                self.val_writer = self._build_writer(str(Path("tensorboard") / "validation"))
        except BaseException:
            if self.lease:
                self.lease.release()
            raise

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    # -- construction ----------------------------------------------------------------------

    def _setup_output(self) -> None:
        """The run folder. A remote run (s3://...) trains in a local staging folder per node and
        mirrors it (pipeline.runs); a local one must be the same folder on every node."""
        self.url, self.endpoint = self.run.train.output, self.run.data.endpoint_url
        self.remote = runs.is_remote(self.url)
        self.output = runs.local_dir(self.url)
        self.ckpt_root = self.output / "checkpoints"
        if not self.remote and self.world > 1:
            self._check_output_is_shared()
        self.comm.group_by_folder(self.output)

    def _place_checkpoints(self) -> None:
        """A remote run's checkpoints, on each node, in memory or on disk (checkpoint.staging;
        after the lease: a second run of the URL must not move the first one's folder). Room is
        asked for two of this node's checkpoints, each its ranks' optimizer shares (fp32
        master weights and Adam's two moments, with room for the fp32 kind of every one) and
        the module's weights (at most 4 bytes each)."""
        if not self.remote:
            return
        from pipeline.plan import parameter_count

        params = parameter_count(self.run)
        ranks_here = len(self.comm.folder_peers or [self.rank])
        need = 2 * params * (4 + 16 * ranks_here / self.world)
        self._checkpoint_bytes = need / 2
        staging = self.run.checkpoint.staging
        self.comm.on_each_node(
            "placing the checkpoint folder",
            lambda: self.log(runs.stage_checkpoints(self.url, staging, need)),
        )

    def _take_lease(self) -> None:
        """Rank 0 takes the run's lease (pipeline.train.lease) before anything is read or
        written; every rank stops if another live run holds it."""
        self.lease: Lease | None = None
        problem = ""
        if self.rank == 0:
            lease = Lease(self.url, self.endpoint, self.run.checkpoint.lease_s, log=self.log)
            try:
                lease.acquire()
                self.lease = lease
            except RunLeased as e:
                problem = str(e)
        problem = self.comm.gather(problem, "the run's lease")[0]
        if problem:
            raise RunLeased(problem)

    def _check_output_is_shared(self) -> None:
        """Rank 0 leaves a token in the output folder; a rank that cannot read it writes its
        checkpoint shards where rank 0 will never find them. Refused with the ranks named."""
        token = uuid.uuid4().hex if self.rank == 0 else ""
        token = self.comm.gather(token, "rank 0's output token")[0]
        probe = self.output / f".tessera-shared-{token}"
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        self.comm.barrier("rank 0 to write the shared-folder probe")
        sees = probe.is_file() and probe.read_text() == token
        blind = [r for r, ok in enumerate(self.comm.gather(sees, "the probe check")) if not ok]
        self.comm.barrier("every rank to read the shared-folder probe")
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        if blind:
            raise ConfigError(
                f"train.output: {self.url} is a local folder that ranks {blind} do not share with "
                "rank 0 (no shared filesystem between the nodes); use object storage (s3://...) "
                "or a filesystem every node mounts at the same path"
            )

    def _build_input(self) -> TrainingInput:
        if self.run.train.validate_every_steps:  # the split exists, before any work
            manifest = load_manifest(self.run.data.url, self.endpoint)
            try:
                manifest.split(self.run.data.val_split)
            except DatasetError as e:
                raise ConfigError(
                    f"train.validate_every_steps reads data.val_split: {e} (carve one with "
                    "`tessera prepare --val-fraction`)"
                ) from None
        source = stream_config(self.run, self.run.data.train_split, self.micro, train=True)
        if self.run.data.ingest == "ray-data":
            from pipeline.data.ray_ingest import RayDataInput

            return RayDataInput(source)
        return Stream(source, self.rank, self.world)

    def _finetune_init(self) -> Weights | None:
        """finetune.init's weights for a run that starts fresh (a resumed finetune has them)."""
        if not self.run.finetune.init:
            return None
        init = read_weights_for(
            self.run.finetune.init, self.run.model, "finetune.init", self.endpoint
        )
        self.init_provenance = init.provenance
        return init

    def _choose_precision(self, start: Path | None) -> None:
        """deepspeed.precision "auto" made concrete for this device (and kept across resumes);
        the checkpoint's config records the choice."""
        ds = self.run.deepspeed
        saved = ""
        if start is not None:
            saved = checkpoint.read_state(start)["config"].get("deepspeed", {}).get("precision", "")
        precision, why = resolve_precision(ds.precision, self.comm.device, saved)
        if precision == "bf16" and not native_bf16(self.comm.device) and self.rank == 0:
            self.log(
                f"warning: deepspeed.precision is bf16 but this {self.comm.device.type} has no "
                "bf16 matmuls; they are emulated, about 10x slower than fp32 (precision: auto "
                "would choose fp32 here)"
            )
        if precision != ds.precision:
            if self.rank == 0:
                self.log(f"deepspeed.precision: {ds.precision} -> {precision} ({why})")
            self.run = dataclasses.replace(
                self.run, deepspeed=dataclasses.replace(ds, precision=precision)
            )

    def _build_engine(self, init: Weights | None, universal: bool) -> None:
        run = self.run
        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        head = (
            {"head_bias": run.train.head_bias}
            if run.train.objective == "supervised-sigmoid"
            else {}
        )
        with model_init_context(run, self.world):
            model = create_model(run.model, **head)
        if init is not None:
            self._load_init(model, init)
        self.engine, _, self.scheduler = build_engine(
            model, run, self.world, run.train.steps, load_universal=universal
        )
        if run.train.sync_batchnorm:
            self.engine.module.set_batchnorm_sync(
                lambda t: self.comm.sum_differentiable(t, "BatchNorm's batch statistics")
            )
        self.dtype = next(self.engine.module.parameters()).dtype
        self.objective = OBJECTIVES[run.train.objective]
        self._objective_args = {
            "mask_prob": run.train.mask_prob,
            "generative_weight": run.finetune.generative_weight,
            "label_smoothing": run.train.label_smoothing,
            "mixup": run.train.mixup,  # in training mode only: validation is not mixed
            "cutmix": run.train.cutmix,
            "teacher": self._build_teacher(),
        }
        self.flops_per_sample = run.model.train_flops()
        peak = run.logging.peak_tflops * 1e12 or measure_peak_flops(self.dtype, self.engine.device)
        self.peak_flops = peak

    def _build_teacher(self) -> torch.nn.Module | None:
        """train.teacher's model, frozen and in eval mode on this rank's device, in the
        training dtype; built outside DeepSpeed, so no ZeRO stage partitions it. It must see
        the student's images and predict its classes."""
        run = self.run
        if not run.train.teacher:
            return None
        weights = read_weights(run.train.teacher, self.endpoint)
        cfg, student = weights.config, run.model
        same = {k: (getattr(cfg, k, None), getattr(student, k)) for k in
                ("image_size", "channels", "num_classes")}  # fmt: skip
        wrong = [f"{k} {a} != {b}" for k, (a, b) in same.items() if a != b]
        if wrong:
            raise ConfigError(
                f"train.teacher: {weights.source} holds a {cfg.name} that cannot teach "
                f"{student.name}: {'; '.join(wrong)}"
            )
        teacher = weights.build().to(self.engine.device, self.dtype).eval().requires_grad_(False)
        if self.rank == 0:
            self.log(f"distilling from {weights.source} ({cfg.name}, frozen)")
        return teacher

    def _build_writer(self, folder: str = "tensorboard"):
        if self.rank != 0 or not self.run.logging.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a resume, events past the checkpoint are dropped: one curve.
        return SummaryWriter(str(self.output / folder), purge_step=self.step)

    # -- checkpoints -----------------------------------------------------------------------

    def _load_init(self, model: torch.nn.Module, init: Weights) -> None:
        """Pretrained weights in, a new head (zero, or normal with std finetune.head_init), or
        the pretrained head when finetune.keep_head says the labels are the same."""
        keep = self.run.finetune.keep_head
        if keep:
            saved, wanted = init.config.num_classes, self.run.model.num_classes
            if saved != wanted:
                raise ConfigError(
                    f"finetune.keep_head: {init.source} has a head of {saved} classes, this run "
                    f"has {wanted}; keep_head needs the same labels (or set it false)"
                )
        state = {k: v for k, v in init.state.items() if keep or not k.startswith("head.")}
        with modifiable_params(model, self.run):
            load_pretrained(model, state, source=init.source)
            head = getattr(model, "head", None)
            if not keep and self.run.finetune.head_init > 0 and isinstance(head, torch.nn.Linear):
                torch.nn.init.trunc_normal_(head.weight, std=self.run.finetune.head_init)
        if self.rank == 0:
            p = init.provenance
            what = "its head kept" if keep else f"new head of {self.run.model.num_classes} classes"
            self.log(f"initialised from {init.source} ({p['model']}, step {p['step']}); {what}")

    def _checkpoint_to_resume(self, resume: str, restart: bool = False) -> Path | None:
        if resume != "auto":
            resume = self._keep_newer_checkpoints(resume, restart)
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = self._unreadable(path)  # an explicit choice: no other is tried
            if self.comm.any(bool(problem), f"checking {path}"):
                self._raise_first(problem, path.name)
            return path
        # The newest complete checkpoint that can be read; one that cannot (a damaged shard,
        # a planted pickle) is passed over with a warning for the one before.
        names = runs.complete_checkpoints(self.url, self.endpoint)
        first_problem = ""
        for name in reversed(names):
            if self.remote:
                self.comm.on_each_node(
                    f"downloading {self.url}/checkpoints/{name}",
                    lambda n=name: runs.pull_checkpoint(self.url, n, self.endpoint),
                )
            path = self.ckpt_root / name
            problem = self._unreadable(path)
            if not self.comm.any(bool(problem), f"checking {name}"):
                return path
            problems = [p for p in self.comm.gather(problem, f"what is wrong with {name}") if p]
            first_problem = first_problem or problems[0]
            self._set_aside(name)
            if self.rank == 0:
                self.log(
                    f"warning: cannot resume from {name}: {problems[0]}; moved aside to "
                    f"{name}.unreadable-*, trying the one before"
                )
        if first_problem:
            raise CorruptCheckpoint(
                f"no complete checkpoint of {self.url} can be read: {first_problem}"
            )
        return None

    def _set_aside(self, name: str) -> None:
        """An unreadable checkpoint is kept (to look at) under a name no resume, save or prune
        takes for a checkpoint; otherwise the same step saved again would be skipped as
        complete. On a remote run its marker goes too, and the next checkpoint's pruning
        removes it there."""
        path = self.ckpt_root / name

        def move() -> None:
            if path.is_dir():
                path.rename(path.with_name(f"{name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"))
            if self.remote and self.rank == 0:
                runs.unpublish_checkpoint(self.url, name, self.endpoint)

        if self.remote:
            self.comm.on_each_node(f"setting {name} aside", move)
        else:
            self.comm.on_rank_0(f"setting {name} aside", move)

    def _unreadable(self, path: Path) -> str:
        """ "" if `path` is a complete checkpoint whose files match their marker and read as
        plain data, else why not. The hashing is split among the ranks that see the folder."""
        try:
            checkpoint.read_state(path)
            checkpoint.verify(path, self.comm.my_share(sorted(checkpoint.manifest(path))))
            refuse_unsafe_pickles(path)
        except (OSError, ValueError, CorruptCheckpoint, UnsafeCheckpoint) as e:
            return str(e)
        return ""

    def _raise_first(self, problem: str, name: str) -> None:
        problems = [p for p in self.comm.gather(problem, f"what is wrong with {name}") if p]
        raise CorruptCheckpoint(problems[0])

    def _keep_newer_checkpoints(self, resume: str, restart: bool) -> str:
        """A run started over (--resume never) or from an older checkpoint, in a folder holding
        newer ones, would have its own checkpoints pruned as it writes them and an old one
        resumed next time: refused, unless --restart moves the old ones aside (never deleted).
        Returns `resume`, pointing into the moved folder if it was inside it."""
        newest = runs.latest_checkpoint(self.url, self.endpoint)
        start = -1 if resume == "never" else checkpoint.step_of(Path(resume).name)
        if newest is None or checkpoint.step_of(newest) <= start:
            return resume
        if not restart:
            raise ConfigError(
                f"train.output: {self.url} holds checkpoints up to {newest}; a run started "
                f"{'over' if resume == 'never' else f'from {resume}'} there would prune its "
                "own checkpoints and be mixed with them. Use another train.output, or "
                "--restart to move the old checkpoints aside"
            )
        if self.remote:
            raise ConfigError(
                f"--restart: {self.url} is on object storage, where moving checkpoints aside "
                "means copying them; use another train.output"
            )
        root = self.ckpt_root.resolve()
        name = f"checkpoints.before-restart-{time.strftime('%Y%m%d-%H%M%S')}"
        aside = self.output / self.comm.gather(name, "the restart folder's name")[0]  # rank 0's

        def move() -> None:
            self.ckpt_root.rename(aside)
            self.log(f"--restart: moved {root} aside to {aside}")

        self.comm.on_rank_0(f"moving {root} aside", move)
        if resume != "never" and Path(resume).resolve().is_relative_to(root):
            return str(aside / Path(resume).resolve().relative_to(root))
        return resume

    def _prepare_universal(self, path: Path) -> bool:
        """A checkpoint written at another world size or ZeRO stage loads through DeepSpeed's
        universal format: converted once per filesystem, next to the checkpoints (by rank 0 for
        a local run, by every node's first rank for a remote one, whose staging folders are
        the nodes' own)."""
        state = checkpoint.read_state(path)
        saved_stage = state["config"]["deepspeed"]["zero_stage"]
        if state["world"] == self.world and saved_stage == self.run.deepspeed.zero_stage:
            return False
        target = checkpoint.universal_path(path)
        if self.rank == 0:
            self.log(
                f"{path} was written by {state['world']} ranks at ZeRO-{saved_stage}; converting "
                f"it for {self.world} ranks at ZeRO-{self.run.deepspeed.zero_stage}"
            )

        def convert() -> None:
            if (target / checkpoint.COMPLETE).is_file():
                try:
                    checkpoint.verify(target)
                    return
                except CorruptCheckpoint as e:
                    self.log(f"warning: {e}; converting {path.name} again")
            shutil.rmtree(target, ignore_errors=True)
            to_universal(path, target)
            files = {n: checkpoint.digest(target / n) for n in checkpoint.listing(target)}
            checkpoint.write_marker(target, files, step=state["step"])

        what = f"converting {path.name} to a universal checkpoint"
        if self.remote:
            self.comm.on_each_node(what, convert)
        else:
            self.comm.on_rank_0(what, convert)
        return True

    def _resume(self, path: Path, universal: bool) -> None:
        state = checkpoint.load(self.engine, path, self.rank, universal=universal)
        replay_cpu_adam_steps(self.engine)
        self.step = state["step"]
        self.skipped = state.get("skipped", 0)
        self.init_provenance = state.get("init", {})
        self.stream.load_state_dict(state["stream"])
        if self.rank == 0:
            self.log(f"resumed from {path} at step {self.step}")

    def save(self, wait: bool = False) -> Path:
        """A checkpoint of this step. Training waits only for DeepSpeed's own write of the shards
        (and for the checkpoint before, if that is still finishing); hashing, the marker and,
        for a remote run, the upload happen behind it (`checkpoint.background`), unless `wait`.
        Returns the checkpoint's folder, which is complete once `wait_for_checkpoint` is."""
        self.wait_for_checkpoint()  # one at a time: its error, if any, stops the run here
        lost = self._lease_lost()
        lost = self.comm.gather(lost, "whether this run still holds its lease")[0]
        if lost:
            raise RunLeased(f"stopped before saving step {self.step}: {lost}")
        self._average_running_stats()
        states = self.comm.gather(self.stream.state_dict(), "every rank's data cursor")
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "stream": self.stream.merge_states(states),
            "world": self.world,
            "config": config_to_raw(self.run),
            "init": self.init_provenance,
        }
        if self.writer:
            self.writer.flush()  # on this thread: what the upload behind training sends
        self._keep_staging_room()
        pending = checkpoint.write(
            self.engine, self.ckpt_root, self.step, state, self.comm, self.run.checkpoint.keep_last
        )
        if pending is None:  # complete already
            return self.ckpt_root / checkpoint.tag(self.step)
        if wait or not self.run.checkpoint.background:
            self._finish(pending, self.comm)
        else:
            behind = self.comm.background()
            self.behind.start(pending.name, lambda: self._finish(pending, behind))
        return pending.path

    def _keep_staging_room(self) -> None:
        """Before a save: if memory staging has no room left for it on some node (other
        processes filled it since the start), every node's checkpoints go to disk staging for
        the rest of the run, with what memory held; a save into full memory would fail the
        run. Nothing reads the folder now: the checkpoint before is complete."""
        if not self.remote or self.run.checkpoint.staging == "disk":  # on disk on every node
            return
        short = runs.memory_short(self.url, self._checkpoint_bytes)
        if not self.comm.any(bool(short), "whether memory staging has room for a checkpoint"):
            return

        def to_disk() -> None:  # on each node's first rank
            why = f"memory staging is short: {short}" if short else "another node's is short"
            moved = runs.stage_checkpoints(self.url, "disk", 0.0)
            self.log(f"warning: step {self.step}: {why}; {moved} from here")

        self.comm.on_each_node(f"moving checkpoint staging to disk at step {self.step}", to_disk)

    def _average_running_stats(self) -> None:
        """BatchNorm's running statistics, which each rank updated on its own batches, replaced
        by their mean over ranks on every rank: a checkpoint (written from rank 0's copy) and
        an evaluation hold what all ranks saw, and a resumed run continues from the values the
        uninterrupted one has."""
        stats = self.engine.module.running_stats()
        self.comm.average_(stats, "averaging BatchNorm's running statistics")

    def wait_for_checkpoint(self, timeout_s: float | None = None) -> bool:
        """Until the checkpoint finishing behind training is complete (raising its error);
        False if it still is not after timeout_s."""
        return self.behind.wait(timeout_s)

    def _lease_lost(self) -> str:
        return self.lease.check() if self.lease else ""

    def _finish(self, pending: checkpoint.Pending, comm: Comm) -> None:
        path = checkpoint.finish(pending, comm, lost=self._lease_lost)
        if self.remote:
            self._publish(path, comm)

    def _publish(self, path: Path, comm: Comm) -> None:
        """The checkpoint just completed locally, to the remote run: every node's shards, then
        (rank 0) its marker and `latest`, then TensorBoard. Complete there, or ignored."""
        comm.on_each_node(
            f"uploading {path.name}",
            lambda: runs.push_files(self.url, path, self.endpoint, skip=runs.WRITTEN_LAST),
        )

        def publish() -> None:
            if comm.rank == 0:
                runs.publish_checkpoint(
                    self.url, path.name, self.run.checkpoint.keep_last, self.endpoint
                )
                self._push_logs()
            runs.prune_local(self.url, keep=path.name)

        comm.on_each_node(f"publishing {path.name}", publish)

    def _push_logs(self) -> None:
        """TensorBoard events and the pictures, to a remote run."""
        if self.writer and self.remote:
            for folder in ("tensorboard", "images"):
                runs.push_files(self.url, self.output / folder, self.endpoint)

    # -- training --------------------------------------------------------------------------

    def _on_sigterm(self, *_: Any) -> None:
        self._stop = True

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        device = self.engine.device
        if "image" in out:
            out["image"] = model_input(out["image"].to(device, non_blocking=True)).to(self.dtype)
        for key in ("tokens", "label"):
            if key in out:
                out[key] = out[key].to(device, non_blocking=True)
        return out

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float] | None:
        """One optimizer step over `accum` micro-batches; None if it was skipped because a loss
        or a gradient was not finite on some rank (every rank skips it together).

        A micro-batch whose loss is not finite still goes through backward, its gradients made
        NaN, and so do the micro-batches after it: every micro-batch of the step is drawn (the
        data cursor stays exact) and DeepSpeed reaches its accumulation boundary, where its
        overflow check discards the whole step: no update, no scheduler step."""
        totals: dict[str, float] = {}
        poisoned = False
        for micro, raw in enumerate(self._draw(batches)):
            if self._visual is None:
                self._visual = {
                    k: raw[k][:4].to(self.engine.device) for k in ("image", "tokens") if k in raw
                }
            batch = self._to_device(raw)
            seed = hash((self.run.train.seed, self.step, micro, self.rank)) % (1 << 62)
            torch.manual_seed(seed)
            gen = torch.Generator(device=self.engine.device).manual_seed(seed)
            loss, metrics = self.objective(
                self.engine, batch, generator=gen, **self._objective_args
            )
            if not torch.isfinite(loss).item():
                poisoned = True
                loss = loss * float("nan")  # NaN gradients for every parameter it reaches
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.accum
        poisoned = self.comm.any(poisoned, "the non-finite-loss check")
        # A finite loss can still give non-finite gradients. DeepSpeed checks the global
        # gradient norm (the same on every rank) and skips the update; count it as skipped.
        applied = self.engine.was_step_applied()
        if poisoned and applied:
            raise NonFiniteError(
                f"step {self.step + 1}: a loss was not finite, yet DeepSpeed applied the update; "
                "its overflow check is off (bf16.check_grad_overflow in deepspeed.config_file?)"
            )
        return totals if applied else None

    def _draw(self, batches: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        """The step's `accum` micro-batches, drawn before any forward. A rank whose store stays
        unreachable past data.storage_deadline_s raises StorageUnavailable in its reader; every
        rank learns of it here, before a collective of the step could wait on the missing
        rank, gives back what it drew for the step (the cursor returns to the step's start)
        and raises StorageUnavailable on every rank, so that `train` can save a checkpoint of
        the last whole step."""
        mark = self.stream.mark() if hasattr(self.stream, "mark") else None
        drawn, problem = [], ""
        try:
            for _ in range(self.accum):
                drawn.append(next(batches))
        except StorageUnavailable as e:
            problem = f"rank {self.rank}: {e}"
        if self.comm.any(bool(problem), "the storage check"):
            problems = [p for p in self.comm.gather(problem, "what the storage said") if p]
            if mark is not None:
                self.stream.rewind(mark)
            raise StorageUnavailable(problems[0])
        return drawn

    def train(self) -> str:
        """Train to train.steps; returns "done", or "preempted" after SIGTERM (checkpoint saved)."""
        run = self.run
        # SIGTERM (preemption) saves a checkpoint first. Only the main thread may set handlers;
        # a Ray Train worker runs this in another thread, and Ray stops workers itself.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main else None
        batches = iter(self.stream)
        window: dict[str, float] = {}
        n_window, t_window, in_a_row = 0, time.perf_counter(), 0
        start_step = self.step
        try:
            while self.step < run.train.steps:
                try:
                    metrics = self.train_step(batches)
                except StorageUnavailable as e:
                    try:  # the last whole step, its batches not counted
                        saved = f"saved {self.save(wait=True)}"
                    except Exception as failed:  # the run's own store may be the one down
                        saved = f"no checkpoint saved ({failed!r}); the last one stands"
                    if self.rank == 0:
                        self.log(f"storage unreachable: {saved}; run again once it is back")
                    raise StorageUnavailable(f"stopped at step {self.step}: {e}") from None
                if metrics is None:
                    self.skipped += 1
                    in_a_row += 1
                    if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise NonFiniteError(
                            f"loss or gradients not finite on some rank for {in_a_row} steps in a "
                            f"row, within steps [{self.step + 1}, {self.step + in_a_row}]; stopping"
                        )
                    continue
                in_a_row = 0
                self.step += 1
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v
                n_window += 1
                if self.step % run.logging.every_steps == 0 or self.step == run.train.steps:
                    elapsed = time.perf_counter() - t_window
                    self._log(window, n_window, elapsed, start_step)
                    window, n_window, t_window = {}, 0, time.perf_counter()
                every = run.logging.images_every_steps
                if (every and self.step % every == 0) or self.step == run.train.steps:
                    self._log_images()
                every = run.train.validate_every_steps
                if every and (self.step % every == 0 or self.step == run.train.steps):
                    began = time.perf_counter()
                    self.validate()
                    t_window += time.perf_counter() - began  # not training's time
                saved = self.step % run.checkpoint.every_steps == 0 or self.step == run.train.steps
                if saved:
                    began = time.perf_counter()
                    self.save()
                    self._note_blocked(time.perf_counter() - began)
                if self.drain_notice and not self._drain_saved:
                    self._save_on_drain(saved)
                if self.comm.any(self._stop, "the SIGTERM check"):
                    self._save_on_sigterm()
                    return "preempted"
            began = time.perf_counter()
            self.wait_for_checkpoint()
            self._note_blocked(time.perf_counter() - began)
            return "done"
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            if self.writer:
                self.writer.flush()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The objective's loss and own metric (top-1, precision@1, bits/dim) on at most
        train.validate_samples images of data.val_split: every rank reads its share, in eval mode;
        iGPT-BERT's masks come from a fixed seed, so every validation sees the same ones. Logged,
        and written to tensorboard/validation as val/<name>; returns {name: mean}."""
        run = self.run
        cfg = stream_config(run, run.data.val_split, self.micro, train=False)
        stream = Stream(dataclasses.replace(cfg, workers=0), self.rank, self.world)
        batches = math.ceil(run.train.validate_samples / (self.micro * self.world))
        gen = torch.Generator(device=self.engine.device).manual_seed(run.train.seed)
        was_training = self.engine.module.training
        self._average_running_stats()
        self.engine.eval()
        sums: dict[str, float] = {}
        images = 0
        for i, raw in enumerate(stream.iter_epoch()):
            if i == batches:  # the same count on every rank: ZeRO-3 gathers in every forward
                break
            n = len(raw["key"])
            _, metrics = self.objective(
                self.engine, self._to_device(raw), generator=gen, **self._objective_args
            )
            if n:
                images += n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        self.engine.train(was_training)
        names = sorted(OBJECTIVE_METRICS[run.train.objective])
        totals = self.comm.sum([images, *(sums.get(k, 0.0) for k in names)], "validation sums")
        images, means = int(totals[0]), {}
        if images:
            means = {k: v / images for k, v in zip(names, totals[1:], strict=True)}
        if self.rank == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            self.log(
                f"validation at step {self.step}: {shown} ({images} images of {run.data.val_split})"
            )
            if self.val_writer:
                for k, v in means.items():
                    self.val_writer.add_scalar(f"val/{k}", v, self.step)
                self.val_writer.flush()
        return means

    def _note_blocked(self, seconds: float) -> None:
        """Time the training thread stood still for checkpoints: in total (`blocked_s`), by step
        (`blocked_at`, read by benchmarks/train_step.py) and per checkpoint in TensorBoard."""
        self.blocked_s += seconds
        self.blocked_at[self.step] = self.blocked_at.get(self.step, 0.0) + seconds
        if self.writer:
            self.writer.add_scalar("checkpoint/blocked_s", seconds, self.step)

    def _save_on_sigterm(self) -> None:
        """A checkpoint of this step, waited for within checkpoint.grace_s (the launcher kills
        the process after its own grace period): past that, the checkpoint before stands."""
        grace = self.run.checkpoint.grace_s
        began = time.monotonic()
        finished = self.wait_for_checkpoint(grace)  # the one still finishing, if any
        if finished:
            path = self.save()
            finished = self.wait_for_checkpoint(max(0.0, grace - (time.monotonic() - began)))
        if self.rank != 0:
            return
        if finished:
            self.log(f"SIGTERM: saved {path}; the same command resumes it")
        else:
            newest = checkpoint.find_latest(self.ckpt_root) if not self.remote else None
            self.log(
                f"SIGTERM: {self.behind.name} not complete within checkpoint.grace_s={grace:g}s; "
                f"the checkpoint before it stands ({newest or 'the newest complete one'}), and the "
                "same command resumes from there"
            )

    def _save_on_drain(self, saved: bool) -> None:
        """Once a node is announced to go, a checkpoint at this step (unless one was just
        written), complete before training goes on: the node may be gone before a checkpoint
        finishing behind training would be, and the restart would lose the steps."""
        notice = self.drain_notice()
        if not self.comm.any(bool(notice), "the drain-notice check"):
            return
        path = self.ckpt_root / checkpoint.tag(self.step)
        if saved:  # written behind training at this step: completed now
            self.wait_for_checkpoint()
        else:
            path = self.save(wait=True)
        self._drain_saved = True
        if self.rank == 0:
            self.log(f"{notice or 'a node is draining'}: checkpoint {path} saved; training on")

    def _log_images(self) -> None:
        """ViT: attention rollout of the [class] token; ImageGPT: completions of half images.
        Every rank runs the forwards (ZeRO-3 gathers parameters collectively); rank 0 writes.
        A CNN has neither attention nor a generative head: no pictures."""
        if self._visual is None or self.run.model.family not in ("vit", "igpt"):
            return
        model = self.engine.module
        was_training = model.training
        model.eval()
        with gathered_params(self.engine):
            if self.run.model.family == "vit":
                tag, panel = "images/attention_rollout", rollout_panel(model, self._visual["image"])
            else:
                gen = torch.Generator(device=self.engine.device).manual_seed(self.step)
                palette = self.stream.cfg.palette
                tag, panel = (
                    "images/completions",
                    completion_panel(model, self._visual["tokens"], palette, gen),
                )
        model.train(was_training)
        if self.writer:
            self.writer.add_images(tag, panel.float().cpu(), self.step)
        if self.rank == 0 and self.step == self.run.train.steps:  # also a file, at the end
            name = f"{tag.split('/')[-1]}-step-{self.step:07d}.png"
            save_panel(panel.float().cpu(), self.output / "images" / name)

    def close(self, clean: bool = True) -> None:
        """Flush logs and leave the process group, so no communication thread outlives it
        (an exit with one still running aborts the process). After a failure, no barrier: the
        other ranks may be gone. A checkpoint still finishing is waited for, briefly after a
        failure, not at all after SIGTERM (its grace period is spent)."""
        try:
            idle = self.behind.wait(0 if self._stop else None if clean else CLOSE_WAIT_S)
        except Exception as e:
            if clean:
                raise
            idle = True
            self.log(f"warning: {self.behind.name} not complete: {e!r}")
        if getattr(self, "val_writer", None):
            self.val_writer.close()
        if self.writer:
            self.writer.close()
            if clean:
                self._push_logs()
        if getattr(self, "lease", None):
            self.lease.release()
        if not idle:  # its collectives would meet a destroyed group; the exit ends it
            self.log(f"warning: {self.behind.name} still finishing at exit; not complete")
            return
        if clean and self.remote and self.run.checkpoint.staging != "disk":
            self.comm.on_each_node(
                "moving the staged checkpoints out of memory",
                lambda: runs.unstage_memory(self.url, keep=not self._stop),
            )
        self.comm.close(clean)

    def _log(self, window: dict[str, float], n: int, elapsed: float, start_step: int) -> None:
        loss = self.comm.mean(window.get("loss", 0.0) / n, "the loss average")
        samples_per_s = n * self.run.train.global_batch_size / max(elapsed, 1e-9)
        mfu = samples_per_s * self.flops_per_sample / (self.peak_flops * self.world)
        lr = self.scheduler.get_last_lr()[0]
        if self.rank != 0:
            return
        remaining = self.run.train.steps - self.step
        eta = remaining * elapsed / n
        extra = "".join(f" {k} {v / n:.4f}" for k, v in window.items() if k != "loss")
        self.log(
            f"step {self.step}/{self.run.train.steps} loss {loss:.4f}{extra} lr {lr:.2e} "
            f"{samples_per_s:.1f} img/s MFU {100 * mfu:.1f}% ETA {eta:.0f}s"
        )
        if self.writer:
            scalars = {
                "train/loss": loss,
                "train/lr": lr,
                "train/samples_per_s": samples_per_s,
                "train/mfu": mfu,
                "train/skipped_steps": self.skipped,
                "data/errors": self.stream.cursor.errors,
                "data/storage_retries": self.stream.cursor.retries,
                "memory/peak_gb": peak_memory_gb(self.engine.device),
            }
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None and math.isfinite(float(grad_norm)):
                scalars["train/grad_norm"] = float(grad_norm)
            if self.run.model.family == "igpt":
                scalars["train/tokens_per_s"] = samples_per_s * self.run.model.seq_len
            for k, v in window.items():
                if k != "loss":
                    scalars[f"train/{k}"] = v / n
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, self.step)
            sys.stdout.flush()
