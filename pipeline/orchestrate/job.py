"""`tessera run CONFIG`: the whole pipeline as one job, which continues where it stopped.

    stage     runs as                                  skipped when
    prepare   Ray tasks, one per shard                 the dataset's manifest exists (written last)
    pretrain  job.workers training ranks               a complete checkpoint at train.steps exists
    export    the job's own process                    export/model.json is of that final step
    finetune  job.workers training ranks               finetune/results.json has its top-1 row
    evaluate  one task with a training rank's share    results.json has each evaluator's rows

Inside a Ray cluster (`ray job submit` sets RAY_ADDRESS) the training ranks are Ray Train workers
(`TorchTrainer`), each running the same Trainer and DeepSpeed engine as the deepspeed launcher. A
worker that dies is replaced, and the stage resumes from its newest complete checkpoint, up to
job.max_failures times (`FailureConfig`). Elsewhere they are local processes, restarted the same
way. Resubmitting a failed or cancelled job skips every finished stage.

Relative local paths in the config are taken from the directory the job was started in (`--root`,
or TESSERA_ROOT, which `launch/ray-submit.sh` sets): a Ray job itself runs in a temporary copy of
the working directory, where outputs would be lost.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import runs
from pipeline.config import RunConfig, config_to_raw, parse_config
from pipeline.errors import EXIT_PREEMPTED, ConfigError, Preempted
from pipeline.evaluate.results import RESULTS_MD
from pipeline.orchestrate.ray_tasks import connect_ray
from pipeline.storage import basename, filesystem, join


class StageError(RuntimeError):
    """A stage failed after its retries; names the stage and where its log is."""


def say(message: str) -> None:
    print(f"tessera run: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Paths


def absolute_paths(raw: dict[str, Any], root: str) -> dict[str, Any]:
    """The config with every relative local path made absolute against `root`."""

    def fix(url: str, must_exist: bool = False) -> str:
        if not url or "://" in url or os.path.isabs(url):
            return url
        path = os.path.join(root, url)
        return path if not must_exist or os.path.exists(path) else url

    for section, key in (("data", "url"), ("train", "output"), ("eval", "target")):
        if key in raw.get(section, {}):
            raw[section][key] = fix(raw[section][key])
    if raw.get("finetune", {}).get("init"):
        raw["finetune"]["init"] = fix(raw["finetune"]["init"])
    if raw.get("eval", {}).get("transfer"):
        raw["eval"]["transfer"] = [fix(url) for url in raw["eval"]["transfer"]]
    for spec in raw.get("prepare", []):
        spec["output"] = fix(spec["output"])
        spec["source"] = fix(spec["source"], must_exist=True)  # `digits` is a name, not a path
    return raw


def export_url(run: RunConfig) -> str:
    return join(run.train.output, "export")


def finetune_output(run: RunConfig) -> str:
    return join(run.train.output, "finetune")


# ---------------------------------------------------------------------------------------------
# What is already done


def final_checkpoint(run: RunConfig) -> str | None:
    """The name of the run's complete checkpoint at train.steps, if training finished."""
    from pipeline.train.checkpoint import tag

    latest = runs.latest_checkpoint(run.train.output, run.data.endpoint_url)
    return latest if latest is not None and latest >= tag(run.train.steps) else None


def exported_step(run: RunConfig) -> int | None:
    from pipeline.models.weights import read_model_meta

    try:
        return (
            read_model_meta(export_url(run), run.data.endpoint_url)
            .get("provenance", {})
            .get("step")
        )
    except FileNotFoundError:
        return None


def weights_source(run: RunConfig) -> str:
    """What finetune and evaluate start from: the export, else the run's newest checkpoint."""
    return export_url(run) if exported_step(run) is not None else run.train.output


def finetune_run(run: RunConfig) -> RunConfig:
    """The finetune stage's run: the pretraining data (or job.finetune's data.url) as a
    classification task, from the exported weights, writing under finetune/."""
    import dataclasses

    from pipeline.evaluate.run import finetune_config, resolve_target

    def target(final: bool):
        return resolve_target(
            dataclasses.replace(run, eval=dataclasses.replace(run.eval, target="", final=final))
        )

    # Before/after on val, as training's validation; the final report's split (test) is read
    # once after the last step. A target without val measures before/after on the final split.
    report = target(final=True)
    try:
        chosen = target(final=False)
    except ConfigError:
        chosen = report
    extra = [] if report.test_split == chosen.test_split else [
        f"finetune.report_split={report.test_split}"
    ]  # fmt: skip
    steps = run.job.finetune_steps or run.eval.finetune_steps
    return finetune_config(
        run, weights_source(run), chosen, finetune_output(run), steps,
        overrides=[*extra, *run.job.finetune], source="job.finetune",
    )  # fmt: skip


def finetuned(run: RunConfig) -> bool:
    from pipeline.evaluate.results import read_rows

    steps = run.job.finetune_steps or run.eval.finetune_steps
    return any(
        r.evaluator == "finetune" and r.extra.get("finetune_steps") == steps
        for r in read_rows(finetune_output(run), run.data.endpoint_url)
    )


def evaluated(run: RunConfig, source: str) -> bool:
    """Whether every evaluator has rows for `source` on every target (eval.target, transfer)."""
    from pipeline.evaluate.results import read_rows
    from pipeline.evaluate.run import target_urls

    wanted = {*run.eval.evaluators, "pixels"}
    rows = read_rows(run.train.output, run.data.endpoint_url)
    for url in target_urls(run):
        name = basename(url)
        have = {r.evaluator for r in rows if r.source == source and r.target.split(":")[0] == name}
        if not wanted <= have:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Executors: where training ranks and evaluation run


def _executor(run: RunConfig) -> str:
    if run.job.executor != "auto":
        return run.job.executor
    return "ray" if os.environ.get("RAY_ADDRESS") else "local"


def _train_in_process(raw: dict[str, Any], kind: str, drain_notice=None) -> None:
    """One training rank: the same code `tessera pretrain` / `tessera finetune` runs."""
    run = parse_config(raw, source=f"job {kind} stage")
    if kind == "pretrain":
        from pipeline.train.trainer import pretrain

        pretrain(run, resume="auto", drain_notice=drain_notice)
    else:
        from pipeline.train.finetune import finetune

        finetune(run, resume="auto", drain_notice=drain_notice)


def ray_drain_notice() -> str:
    """Ray Train's preemption notice for this worker group ("" while there is none): set when
    Ray drains a node the group runs on (a spot reclaim, `ray drain-node --reason PREEMPTION`).
    Every worker calls it at the same step: it is a barrier over Ray's workers."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return ""
    ranks = sorted(r for rs in info.preempted_node_to_ranks.values() for r in rs)
    left = (
        f", {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s left"
        if info.deadline_ms
        else ""
    )
    return f"Ray is draining the node of ranks {ranks}{left}"


def _ray_worker(config: dict[str, Any]) -> None:
    from pipeline.orchestrate.ray_train import set_rank_environment

    set_rank_environment()
    _train_in_process(config["raw"], config["kind"], drain_notice=ray_drain_notice)


def train_on_ray(run: RunConfig, kind: str) -> None:
    """job.workers Ray Train workers; a dead one is replaced and the stage resumes."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from pipeline.orchestrate.ray_train import RendezvousConfig

    job = run.job
    # Workers' prints reach the job's log once (Ray Train's print patch would add a copy).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    resources = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker:
        resources["GPU"] = job.gpus_per_worker
    storage = str(runs.local_dir(run.train.output).absolute() / "ray-train")
    datasets = {}
    if run.data.ingest == "ray-data":
        from pipeline.data.ray_ingest import DATASET, training_dataset

        datasets[DATASET] = training_dataset(run)
        import ray

        spare = ray.cluster_resources().get("CPU", 0) - job.workers * job.cpus_per_worker
        if spare < 1:
            say(
                f"warning: data.ingest ray-data: the training workers take every CPU the cluster "
                f"has now ({spare + job.workers * job.cpus_per_worker:g}); decoding waits until "
                "nodes with free CPUs join (lower job.cpus_per_worker, or add CPU nodes)"
            )
    trainer = TorchTrainer(
        _ray_worker,
        datasets=datasets,
        train_loop_config={"raw": config_to_raw(run), "kind": kind},
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        torch_config=RendezvousConfig(
            backend="nccl" if job.gpus_per_worker else "gloo",
            timeout_s=math.ceil(run.train.collective_timeout_s),
        ),
        run_config=RayRunConfig(
            name=f"{run.name}-{kind}", storage_path=storage,
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )  # fmt: skip
    try:
        trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError carries the workers' tracebacks
        raise StageError(f"{kind}: failed after {job.max_failures} restarts: {e}") from e


def train_locally(run: RunConfig, kind: str) -> None:
    """job.workers local processes (as torchrun would start them), restarted as a group from
    the newest checkpoint when one fails, up to job.max_failures times."""
    folder = runs.local_dir(run.train.output)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{kind}-config.yaml"
    config.write_text(yaml.safe_dump(config_to_raw(run), sort_keys=False))
    for attempt in range(run.job.max_failures + 1):
        port = free_port()
        procs = []
        for rank in range(run.job.workers):
            env = {
                **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(run.job.workers), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }  # fmt: skip
            cmd = [sys.executable, "-m", "pipeline.cli", kind, str(config), "--resume", "auto"]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = _wait_all(procs)
        if all(c == 0 for c in codes):
            return
        if EXIT_PREEMPTED in codes and set(codes) <= {0, EXIT_PREEMPTED}:
            raise Preempted(f"{kind}: stopped by SIGTERM, checkpoint saved; run the job again")
        if 2 in codes:  # a config or data error: another try would fail the same way
            raise StageError(f"{kind}: stopped by a config or data error (see above); not retried")
        say(f"{kind}: rank exit codes {codes} (attempt {attempt + 1}/{run.job.max_failures + 1})")
    raise StageError(f"{kind}: failed {run.job.max_failures + 1} times; see the log above")


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Exit codes; when one rank fails the others are stopped (they would wait on it forever),
    and so are all when this process is interrupted. A rank that exits preempted (after saving)
    is not a failure: the others are saving too and are waited for. SIGTERM to this process
    (a preempted job, whose ranks may or may not have had it too) is passed on to the ranks,
    which save and exit."""

    def forward(*_: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0, EXIT_PREEMPTED) for p in procs):
                break
            time.sleep(0.2)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.wait() for p in procs]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_in_process(raw: dict[str, Any], source: str) -> None:
    from pipeline.evaluate.run import evaluate

    # A job's evaluation is its final report: on test (README's numbers come from it).
    raw = {**raw, "eval": {**raw.get("eval", {}), "final": True}}
    evaluate(parse_config(raw, source="job evaluate stage"), source)


def _watch_in_process(raw: dict[str, Any]) -> None:
    from pipeline.evaluate.run import watch

    watch(parse_config(raw, source="job.eval_every_checkpoint"), WATCH_POLL_S, WATCH_IDLE_S)


def _evaluate_checkpoint(raw: dict[str, Any], name: str) -> None:
    """One checkpoint's evaluation (a Ray task)."""
    from pipeline.evaluate.run import evaluate_checkpoint

    evaluate_checkpoint(parse_config(raw, source="job.eval_every_checkpoint"), name)


WATCH_POLL_S = 5.0  # how often the watcher lists the run's checkpoints
WATCH_IDLE_S = 6 * 3600.0  # a watcher left without new checkpoints this long gives up


class CheckpointWatcher:
    """`job.eval_every_checkpoint`: each complete checkpoint evaluated on val while pretraining
    goes on; training never waits for it. On Ray, each checkpoint is a task of its own with
    job.eval_cpus (retried on another node if its node dies), submitted one after another by a
    thread of the job's driver, and only where the cluster has room beside the training ranks
    (else the checkpoints left are evaluated after training, `after` saying why); elsewhere,
    `evaluate --watch` in a process beside the ranks."""

    def __init__(self, run: RunConfig, executor: str) -> None:
        from pipeline.evaluate.run import resolve_targets

        raw = config_to_raw(run)
        self.raw = {**raw, "eval": {**raw["eval"], "final": False}}
        self.run = parse_config(self.raw, source="job.eval_every_checkpoint")
        # A target without val stops the job now, not once training has ended.
        resolve_targets(self.run)
        self.proc = self.task = self.ref = self.thread = self.error = None
        self.stopping = threading.Event()
        self.after = ""  # why the checkpoints are evaluated after training instead
        if executor == "ray":
            import ray

            job = run.job
            cpus, gpus = job.eval_cpus or job.cpus_per_worker, job.gpus_per_worker
            self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=job.max_failures)(
                _evaluate_checkpoint
            )
            # A task waiting for its resources must not hold what the training ranks need, nor
            # wait for theirs: Ray would queue it behind the ranks until training ended.
            have = ray.cluster_resources()
            cpu_need = job.workers * job.cpus_per_worker + cpus
            gpu_need = job.workers * gpus + gpus
            if have.get("CPU", 0) < cpu_need or have.get("GPU", 0) < gpu_need:
                self.after = (
                    f"the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} "
                    f"GPUs; the ranks and the watcher need {cpu_need:g} and {gpu_need:g}"
                )
            else:
                self.thread = threading.Thread(
                    target=self._submit_each, name="tessera-eval-submit", daemon=True
                )
                self.thread.start()
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no forked copy of the job's threads
            self.proc = ctx.Process(
                target=_watch_in_process, args=(self.raw,), name="tessera-watch"
            )
            self.proc.start()

    def _submit_each(self) -> None:
        """A Ray task for each new complete checkpoint, oldest first, one at a time (their rows
        and the feature cache are appended to and pruned by one evaluation at a time), until the
        final step's is evaluated (or found evaluated)."""
        import ray

        from pipeline.evaluate.results import read_rows
        from pipeline.train.checkpoint import tag

        url, endpoint = self.run.train.output, self.run.data.endpoint_url
        final, limit = tag(self.run.train.steps), self.run.job.eval_checkpoint_timeout_s
        try:
            done = {basename(r.source) for r in read_rows(url, endpoint)}  # step-NNNNNNN
            while final not in done and not self.stopping.is_set():
                for name in runs.complete_checkpoints(url, endpoint):
                    if name in done or self.stopping.is_set():
                        continue
                    done.add(name)
                    self.ref = self.task.remote(self.raw, name)
                    try:
                        ray.get(self.ref, timeout=limit)
                    except ray.exceptions.GetTimeoutError:
                        ray.cancel(self.ref, force=True)
                        raise TimeoutError(
                            f"the evaluation of {name} ran past job.eval_checkpoint_timeout_s="
                            f"{limit:g}s and was cancelled"
                        ) from None
                    self.ref = None
                self.stopping.wait(WATCH_POLL_S)
        except BaseException as e:  # handed to wait(); stop() cancelling a task lands here too
            self.error = e

    def wait(self) -> None:
        """After training: until the final checkpoint is evaluated."""
        if self.task is not None:
            if self.thread is None:  # no room while training: now, each checkpoint left
                self._submit_each()
            else:
                self.thread.join()
            if self.error is not None:
                raise StageError(f"eval_every_checkpoint: {self.error}") from self.error
            return
        self.proc.join()
        if self.proc.exitcode != 0:
            raise StageError(f"eval_every_checkpoint: the watcher exited {self.proc.exitcode}")

    def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            import ray

            ref = self.ref
            if ref is not None:
                ray.cancel(ref, force=True)
            if self.thread is not None:
                self.thread.join(30)
        elif self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)


def evaluate_on(executor: str, run: RunConfig, source: str) -> None:
    """Evaluation needs one accelerator: on Ray, a task with one training rank's resources (or
    job.eval_cpus CPUs: Ray sets the task's thread count from them)."""
    if executor == "local":
        _evaluate_in_process(config_to_raw(run), source)
        return
    import ray

    cpus = run.job.eval_cpus or run.job.cpus_per_worker
    task = ray.remote(num_cpus=cpus, num_gpus=run.job.gpus_per_worker)(_evaluate_in_process)
    ray.get(task.options(max_retries=run.job.max_failures).remote(config_to_raw(run), source))


# ---------------------------------------------------------------------------------------------
# The job


def run_job(run: RunConfig) -> str:
    """Run run.job.stages in order, each skipped when its output is complete; returns the path
    of the results table."""
    executor = _executor(run)
    if run.data.ingest == "ray-data" and executor != "ray":
        raise ConfigError(
            "data.ingest: ray-data streams batches from Ray Data to Ray Train workers; run the "
            "job on Ray (launch/ray-submit.sh, or job.executor=ray), or use data.ingest=stream"
        )
    stages = run.job.stages
    say(f"{run.name}: stages {' -> '.join(stages)} ({executor}, {run.job.workers} workers)")
    started_ray = connect_ray() if executor == "ray" else False
    try:
        for i, stage in enumerate(stages, 1):
            began = time.perf_counter()
            say(f"[{i}/{len(stages)} {stage}] started")
            note = STAGE_FUNCTIONS[stage](run, executor)
            say(f"[{i}/{len(stages)} {stage}] {note} ({time.perf_counter() - began:.0f}s)")
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    from pipeline.evaluate.results import read_markdown

    table = read_markdown(run.train.output, run.data.endpoint_url)
    if table:
        say(f"results ({join(run.train.output, RESULTS_MD)}):\n\n{table}")
    curves = runs.local_dir(run.train.output) / "tensorboard"
    if curves.is_dir():
        picture = write_curves(run)
        say(f"curves: {picture}; all of them: tensorboard --logdir {curves}")
    return join(run.train.output, RESULTS_MD)


def write_curves(run: RunConfig) -> str:
    """curves.png in the run folder: pretraining loss (and validation loss), finetuning loss
    beside it, the learning rate (logging.log_scale_loss: losses on a log axis)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.train.visuals import curves_png

    def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
        if not folder.is_dir():
            return []
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            return []
        return [(e.step, e.value) for e in events.Scalars(tag)]

    local = runs.local_dir(run.train.output)
    board, tuned = local / "tensorboard", runs.local_dir(finetune_output(run)) / "tensorboard"
    panels = {
        "pretraining loss": {
            "training": scalars(board, "train/loss"),
            "validation": scalars(board / "validation", "val/loss"),
        },
        "finetuning loss": {
            "training": scalars(tuned, "train/loss"),
            "validation": scalars(tuned / "validation", "val/loss"),
        },
        "learning rate": {"pretraining": scalars(board, "train/lr")},
    }
    path = local / "curves.png"
    log_scale = ("pretraining loss", "finetuning loss") if run.logging.log_scale_loss else ()
    title = f"{run.name} ({run.model.name}, {run.train.objective})"
    curves_png(panels, path, title=title, log_scale=log_scale)
    if runs.is_remote(run.train.output):
        fs, remote = filesystem(run.train.output, run.data.endpoint_url)
        fs.put_file(str(path), join(remote, "curves.png"))
        return join(run.train.output, "curves.png")
    return str(path)


def stage_prepare(run: RunConfig, executor: str) -> str:
    from pipeline.data.prepare import PrepareOptions, parse_size, prepare
    from pipeline.data.shards import MANIFEST
    from pipeline.data.sources import open_source

    if not run.prepare:
        return "nothing to prepare (no `prepare` section)"
    notes = []
    for i, spec in enumerate(run.prepare):
        endpoint = run.data.endpoint_url
        fs, path = filesystem(spec.output, endpoint)
        if fs.exists(join(path, MANIFEST)):
            notes.append(f"{spec.output} complete")
            continue
        try:
            shard_bytes = parse_size(spec.shard_size)
        except ValueError as e:
            raise ConfigError(f"prepare[{i}].shard_size: {e}") from None
        opts = PrepareOptions(
            seed=spec.seed, shard_bytes=shard_bytes, samples_per_shard=spec.samples_per_shard,
            val_fraction=spec.val_fraction, palette_size=spec.palette,
            executor="ray" if executor == "ray" else "local", endpoint_url=endpoint,
        )  # fmt: skip
        manifest = prepare(open_source(spec.source, spec.format, endpoint), spec.output, opts)
        counts = ", ".join(f"{n} {s.samples}" for n, s in manifest.splits.items())
        notes.append(f"{spec.output} written ({counts})")
    return "; ".join(notes)


def stage_pretrain(run: RunConfig, executor: str) -> str:
    ckpts = join(run.train.output, runs.CHECKPOINTS)
    done = final_checkpoint(run)
    if done is not None:
        return f"skipped: {ckpts}/{done} is complete"
    watcher = CheckpointWatcher(run, executor) if run.job.eval_every_checkpoint else None
    try:
        (train_on_ray if executor == "ray" else train_locally)(run, "pretrain")
        done = final_checkpoint(run)
        if done is None:
            raise StageError(f"pretrain: ended without a checkpoint at step {run.train.steps}")
    except BaseException:
        if watcher:
            watcher.stop()
        raise
    note = f"done: {ckpts}/{done}"
    if watcher:
        from pipeline.evaluate.results import read_rows

        watcher.wait()
        rows = read_rows(run.train.output, run.data.endpoint_url)
        steps = sorted({r.pretrain_steps for r in rows if basename(r.source).startswith("step-")})
        when = f"after training ({watcher.after})" if watcher.after else "while training"
        note += f"; checkpoints of steps {', '.join(map(str, steps))} evaluated {when}"
    return note


def stage_export(run: RunConfig, executor: str) -> str:
    from pipeline.train.export import export

    if exported_step(run) == run.train.steps:
        return f"skipped: {export_url(run)} holds step {run.train.steps}"
    name = final_checkpoint(run)
    if name is None:
        raise StageError(f"export: {run.train.output} has no checkpoint at step {run.train.steps}")
    ckpt = runs.pull_checkpoint(run.train.output, name, run.data.endpoint_url)
    export(ckpt, export_url(run), run.data.endpoint_url)
    return f"done: {ckpt} -> {export_url(run)}"


def stage_finetune(run: RunConfig, executor: str) -> str:
    from pipeline.evaluate.results import append_rows, read_rows

    ft = finetune_run(run)
    if not finetuned(run):
        (train_on_ray if executor == "ray" else train_locally)(ft, "finetune")
        if not finetuned(run):
            raise StageError(f"finetune: {ft.train.output} ended without its top-1 row")
        note = f"done: {ft.train.output}"
    else:
        note = f"skipped: {ft.train.output} has its result"
    endpoint = run.data.endpoint_url  # one table for the whole job:
    append_rows(run.train.output, read_rows(ft.train.output, endpoint), endpoint)
    return note


def stage_evaluate(run: RunConfig, executor: str) -> str:
    from pipeline.evaluate.run import UNTRAINED

    sources = [weights_source(run)] + ([UNTRAINED] if run.job.untrained_baseline else [])
    notes = []
    for source in sources:
        if evaluated(run, source):
            notes.append(f"{source} skipped (rows present)")
            continue
        evaluate_on(executor, run, source)
        notes.append(f"{source} done")
    return "; ".join(notes)


STAGE_FUNCTIONS = {
    "prepare": stage_prepare,
    "pretrain": stage_pretrain,
    "export": stage_export,
    "finetune": stage_finetune,
    "evaluate": stage_evaluate,
}
