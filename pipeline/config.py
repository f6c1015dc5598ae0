"""Typed run configuration: one YAML file -> dataclasses that check themselves.

A run is one YAML file with the sections below. `--set a.b=value` overrides any field (the value
is read as YAML). Unknown keys, wrong types and impossible values are `ConfigError`s that name the
file (or the `--set` option), the key, the value and what is allowed.

The `model` section names a registered size and may override any of its architecture fields:

    model: {name: vit-tiny-p4, image_size: 28, channels: 1, num_classes: 10}
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, FieldError, require
from pipeline.models.registry import ModelConfig, config_to_dict, list_models, model_config


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how samples become batches."""

    url: str = (
        ""  # dataset URL written by `tessera prepare` (local path, file://, s3://, memory://)
    )
    train_split: str = "train"
    val_split: str = "val"
    endpoint_url: str = ""  # S3 endpoint; empty: AWS_ENDPOINT_URL or the cloud default
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_shards: int = 4  # shards each reader reads side by side, interleaved
    shuffle_buffer: int = 1024  # samples per shuffled window (held in memory per reader)
    augment: Literal["vit", "none"] = "vit"  # random resized crop + flip, or resize only
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction range of the random crop
    # DeiT's recipe, per sample after the crop and flip (training only): RandAugment's number
    # of operations (0: off; DeiT: 2) and magnitude of 10 (DeiT: 9), random erasing's
    # probability (DeiT: 0.25)
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    random_erasing: float = 0.0
    palette: str = "kmeans"  # ImageGPT tokens: kmeans (fitted by prepare), uniform, grey, or a URL
    palette_size: int = 512  # colours of the grey palette; kmeans and URL palettes bring their own
    max_error_rate: float = 0.01  # stop when more than this fraction of samples is unreadable
    # How long a read keeps retrying an unreachable store (timeouts, resets, 503s) before the run
    # stops with exit status 69 (after a checkpoint): an outage is not bad data, so no sample is
    # skipped for it. Below train.collective_timeout_s, which the other ranks wait meanwhile.
    storage_deadline_s: float = 300.0
    # stream: exactly-once resumable reader on each rank; ray-data: Ray Data decodes on CPU
    # nodes and streams batches to the trainers (`tessera run` on Ray; resumes by epoch)
    ingest: Literal["stream", "ray-data"] = "stream"
    ingest_resource: str = ""  # ray-data: run decode tasks only on nodes with this resource

    def __post_init__(self) -> None:
        require(self.workers >= 0, "workers", self.workers, "must be >= 0")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        require(self.shuffle_shards >= 1, "shuffle_shards", self.shuffle_shards, "must be >= 1")
        lo, hi = self.crop_scale
        require(
            0 < lo <= hi <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1"
        )
        require(self.palette_size >= 2, "palette_size", self.palette_size, "must be >= 2")
        require(self.randaugment_ops >= 0, "randaugment_ops", self.randaugment_ops, "must be >= 0")
        require(
            0 <= self.randaugment_magnitude <= 10, "randaugment_magnitude",
            self.randaugment_magnitude, "must be in [0, 10]",
        )  # fmt: skip
        require(
            0 <= self.random_erasing <= 1, "random_erasing", self.random_erasing,
            "must be in [0, 1]",
        )  # fmt: skip
        require(
            0 <= self.max_error_rate <= 1,
            "max_error_rate",
            self.max_error_rate,
            "must be in [0, 1]",
        )
        require(
            self.storage_deadline_s > 0,
            "storage_deadline_s",
            self.storage_deadline_s,
            "must be > 0 seconds",
        )


Objective = Literal["supervised", "supervised-sigmoid", "igpt-ar", "igpt-bert"]


@dataclass(frozen=True)
class TrainConfig:
    """What is optimised, for how long, and where the run writes."""

    objective: Objective = "supervised"
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # images per optimizer step, over all ranks and accumulation
    seed: int = 0
    output: str = "runs/default"  # run URL: checkpoints/, tensorboard/, results
    mask_prob: float = 0.15  # igpt-bert: fraction of pixels masked
    head_bias: float = -10.0  # supervised-sigmoid: initial head bias (big_vision)
    # Seconds a collective (loss average, NaN agreement, cursor gather) may wait for the slowest
    # rank before the job stops with an error naming what it waited for.
    collective_timeout_s: float = 600.0
    # Every this many steps (and at the end), the loss and the objective's metric on at most
    # validate_samples images of data.val_split (top-1, precision@1, bits/dim); 0: never.
    validate_every_steps: int = 0
    validate_samples: int = 1024
    # BatchNorm (ResNet): false, each rank normalises with its own micro-batch's statistics
    # (as DDP without SyncBatchNorm); true, with the whole step's batch over all ranks (one
    # all-reduce per BatchNorm, forward and backward). Running statistics are averaged over
    # ranks before every save and validation either way.
    sync_batchnorm: bool = False
    # DeiT's hard-label distillation: an export, checkpoint or run folder of any family whose
    # predictions the distillation head learns (a distilled ViT: model.distilled). The teacher
    # is frozen, in eval mode, whole on every rank (outside ZeRO's partitioning), and runs on
    # the same images in the same step. "" for none.
    teacher: str = ""
    label_smoothing: float = 0.0  # supervised: of the class targets (not the teacher's)
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on each training micro-batch: the
    # Beta(alpha, alpha) parameter of each, 0 for off (DeiT: 0.8 and 1.0; with both, each
    # micro-batch takes one of them at even odds). Drawn from the step's seed: a resume at the
    # same world size mixes the same pairs.
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "must be >= 1")
        require(
            self.validate_every_steps >= 0, "validate_every_steps", self.validate_every_steps,
            "must be >= 0 (0: never)",
        )  # fmt: skip
        require(
            self.validate_samples >= 1, "validate_samples", self.validate_samples, "must be >= 1"
        )
        require(
            0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing,
            "must be in [0, 1)",
        )  # fmt: skip
        for key in ("mixup", "cutmix"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0 (0: off)")
        require(
            self.collective_timeout_s > 0,
            "collective_timeout_s",
            self.collective_timeout_s,
            "must be > 0 seconds",
        )
        require(
            self.global_batch_size >= 1, "global_batch_size", self.global_batch_size, "must be >= 1"
        )
        require(0 < self.mask_prob < 1, "mask_prob", self.mask_prob, "must be in (0, 1)")
        require(bool(self.output), "output", self.output, "must name a run URL")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (or SGD with momentum, the CNN baselines' recipe) with warmup and decay; no weight
    decay on norms, biases, position embeddings, tokens."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    layer_decay: float = 1.0  # finetuning: lr scale per block from the top (1 = none)

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "each must be in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        require(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(not (self.nesterov and self.momentum == 0), "nesterov", True, "needs momentum > 0")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """How the DeepSpeed engine shards and casts; `config_file` takes a user's own JSON."""

    zero_stage: int = 2  # 0 (DDP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: bool = False  # optimizer states and step on the CPU
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-3 only)
    # auto: bf16 where the device has bf16 matmuls, else fp16 (GPU) or fp32 (CPU); see
    # pipeline.train.distributed.resolve_precision
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    micro_batch_size: int = (
        0  # per rank per forward; 0: global batch / world size (no accumulation)
    )
    config_file: str = ""  # a DeepSpeed JSON to use instead, checked against this config

    def __post_init__(self) -> None:
        require(
            self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "allowed: 0, 1, 2, 3"
        )
        require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer",
            self.offload_optimizer,
            "needs zero_stage >= 1",
        )
        require(
            not self.offload_params or self.zero_stage == 3,
            "offload_params",
            self.offload_params,
            "needs zero_stage 3",
        )
        require(
            self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, "must be >= 0"
        )


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # also saved on SIGTERM and at the end
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto: newest complete checkpoint; never; or a checkpoint URL
    # Seconds one node's checkpoint download, upload or universal conversion may take (and its
    # other ranks wait for it) before the job stops with an error naming it.
    io_timeout_s: float = 3600.0
    # The run's lease (pipeline.train.lease): renewed every lease_s / 4; a second run of the
    # same train.output stops, and one left by a dead writer elsewhere is taken after lease_s.
    lease_s: float = 60.0
    # Training waits only for DeepSpeed's write of the shards; hashing, the COMPLETE marker and
    # the upload of a remote run happen behind it (false: all before training goes on).
    background: bool = True
    # A run on object storage: where each node's DeepSpeed writes the checkpoint it then
    # uploads. memory: a folder in RAM (/dev/shm, or $TESSERA_MEMORY_STAGING), so training
    # stands still for a copy into memory instead of a disk write; disk: the staging folder;
    # auto: memory when it has room for two of this node's checkpoints (the newest and the next).
    # A save that finds memory without room for it moves the staging to disk for the rest.
    staging: Literal["auto", "memory", "disk"] = "auto"
    # After SIGTERM, how long the checkpoint may take to complete before the process exits
    # anyway (the one before it then stands): keep it below the launcher's grace period.
    grace_s: float = 90.0

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", self.every_steps, "must be >= 1")
        require(self.grace_s >= 0, "grace_s", self.grace_s, "must be >= 0 seconds")
        require(self.lease_s >= 2, "lease_s", self.lease_s, "must be >= 2 seconds")
        require(self.io_timeout_s > 0, "io_timeout_s", self.io_timeout_s, "must be > 0 seconds")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10  # console line and TensorBoard scalars
    tensorboard: bool = True
    images_every_steps: int = 0  # attention maps / completions; 0: only at the end
    peak_tflops: float = 0.0  # device peak for MFU; 0: measure the matmul roof at start
    log_scale_loss: bool = False  # curves.png: losses on a logarithmic axis

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", self.every_steps, "must be >= 1")
        require(
            self.images_every_steps >= 0,
            "images_every_steps",
            self.images_every_steps,
            "must be >= 0",
        )
        require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """Start training from pretrained weights (`tessera finetune`) instead of from scratch."""

    init: str = ""  # an exported model, a complete checkpoint or a run folder; empty: from scratch
    head_init: float = 0.0  # new head: 0 zero weights (ViT paper); s > 0 normal std s (MAE: 2e-5)
    keep_head: bool = False  # keep the pretrained head (the same labels, e.g. sigmoid -> softmax)
    # Autoregressive ImageGPT: add this weight x the next-pixel NLL to the classification loss
    # (the ImageGPT paper's finetuning, L_CLF + L_GEN); 0: classification alone.
    generative_weight: float = 0.0
    # A split read once, after the last step, for the final report (its own results row);
    # training and the before/after top-1 never read it (they read data.val_split). Empty: none.
    report_split: str = ""

    def __post_init__(self) -> None:
        require(self.head_init >= 0, "head_init", self.head_init, "must be >= 0")
        require(
            self.generative_weight >= 0, "generative_weight", self.generative_weight, "must be >= 0"
        )


Evaluator = Literal["linear_probe", "fewshot", "knn", "finetune", "pixels"]


@dataclass(frozen=True)
class EvalConfig:
    evaluators: list[Evaluator] = field(default_factory=list)
    target: str = ""  # dataset URL of the transfer target; empty: the pretraining data
    transfer: list[str] = field(default_factory=list)  # more dataset URLs, evaluated after target
    layers: list[int] = field(default_factory=list)  # probe these blocks; empty: the last one
    concat_layers: bool = False  # one more probe on all of them side by side (held in memory)
    # Poolings probed for each block: 0 the model's own ([class] token, average of tokens); k > 0
    # the block's map averaged over a k x k grid (D k^2 features). Choose among them on val.
    # fewshot and knn read the first.
    grids: list[int] = field(default_factory=lambda: [0])
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])  # few-shot examples per class
    seeds: int = 3  # few-shot repetitions
    knn_k: int = 20
    train_split: str = "train"  # the target's split probes are fitted on
    # The split reported. Empty: "val" (choices are made there), or with `final` "test" (the
    # one report a paper quotes; "val" where a target has no test split, and the row says so).
    test_split: str = ""
    final: bool = False  # `tessera evaluate --final`, and a job's evaluate stage
    holdout: float = 0.1  # fraction of train_split held out to choose the L2 strength
    train_samples: int = 0  # fit on the first N images of train_split (0: all of them)
    test_samples: int = 0  # report on the first N images of test_split (0: all of them)
    batch_size: int = 256  # images per forward during feature extraction
    finetune_steps: int = 500  # the finetune evaluator's training steps
    finetune: list[str] = field(default_factory=list)  # more KEY=VALUE for the finetune run

    def __post_init__(self) -> None:
        require(0 < self.holdout < 1, "holdout", self.holdout, "must be in (0, 1)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.finetune_steps >= 1, "finetune_steps", self.finetune_steps, "must be >= 1")
        require(all(s >= 1 for s in self.shots), "shots", self.shots, "each must be >= 1")
        require(self.seeds >= 1, "seeds", self.seeds, "must be >= 1")
        require(self.knn_k >= 1, "knn_k", self.knn_k, "must be >= 1")
        require(
            bool(self.grids) and all(k >= 0 for k in self.grids), "grids", self.grids,
            "must list poolings: 0 (the model's own) or a grid side k >= 1",
        )  # fmt: skip
        for key in ("train_samples", "test_samples"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0 (0: all)")


SourceFormat = Literal["auto", "idx", "folder", "digits", "jsonl"]


@dataclass(frozen=True)
class PrepareSpec:
    """One dataset `tessera run` writes first (as `tessera prepare SOURCE OUTPUT` would)."""

    source: str  # IDX folder, image folder, `digits`, or a JSONL file (path or URL)
    output: str  # dataset URL
    format: SourceFormat = "auto"
    seed: int = 0
    shard_size: str = "64MB"  # target tar size
    samples_per_shard: int = 0  # a fixed count instead of a size
    val_fraction: float = 0.0  # carve a "val" split out of "train"
    palette: int = 0  # fit a k-colour palette (iGPT); 0: none

    def __post_init__(self) -> None:
        require(bool(self.source), "source", self.source, "must name a source")
        require(bool(self.output), "output", self.output, "must name a dataset URL")
        require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        require(
            self.samples_per_shard >= 0, "samples_per_shard", self.samples_per_shard, "must be >= 0"
        )
        require(self.palette >= 0, "palette", self.palette, "must be >= 0")


Stage = Literal["prepare", "pretrain", "export", "finetune", "evaluate"]
STAGES: tuple[str, ...] = typing.get_args(Stage)


@dataclass(frozen=True)
class JobConfig:
    """`tessera run`: the stages it runs, and the workers that train (Ray Train in a cluster)."""

    stages: list[Stage] = field(default_factory=lambda: list(STAGES))
    executor: Literal["auto", "ray", "local"] = "auto"  # auto: ray when RAY_ADDRESS is set
    workers: int = 1  # training ranks: Ray Train workers (ray) or processes (local)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on GPU nodes; 0: CPU ranks (gloo)
    eval_cpus: float = 0.0  # the evaluate task's CPUs (its threads); 0: cpus_per_worker
    max_failures: int = 2  # worker deaths survived per training stage (resume from checkpoint)
    finetune: list[str] = field(default_factory=list)  # KEY=VALUE for the finetune stage's run
    finetune_steps: int = 0  # 0: eval.finetune_steps
    untrained_baseline: bool = True  # also evaluate the network at its initialisation
    # Evaluate each checkpoint on val while pretraining goes on (`tessera evaluate --watch` as its
    # own Ray task or process, job.eval_cpus); TensorBoard's eval/ plots it against the step.
    eval_every_checkpoint: bool = False
    # On Ray, how long the job waits for one checkpoint's evaluation task before it cancels it
    # and fails the pretrain stage (a task hung on another node would otherwise hold the end).
    eval_checkpoint_timeout_s: float = 4 * 3600.0

    def __post_init__(self) -> None:
        require(len(self.stages) > 0, "stages", self.stages, f"name at least one of {STAGES}")
        order = [STAGES.index(s) for s in self.stages]
        require(order == sorted(set(order)), "stages", self.stages, f"in the order {STAGES}")
        require(self.workers >= 1, "workers", self.workers, "must be >= 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        require(self.eval_cpus >= 0, "eval_cpus", self.eval_cpus, "must be >= 0")
        require(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        require(self.finetune_steps >= 0, "finetune_steps", self.finetune_steps, "must be >= 0")
        require(
            self.eval_checkpoint_timeout_s > 0,
            "eval_checkpoint_timeout_s",
            self.eval_checkpoint_timeout_s,
            "must be > 0 seconds",
        )


@dataclass(frozen=True)
class RunConfig:
    """One run: a model, its data and how it is trained, checkpointed, logged and evaluated."""

    model: ModelConfig
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prepare: list[PrepareSpec] = field(default_factory=list)  # datasets `tessera run` writes
    job: JobConfig = field(default_factory=JobConfig)

    def __post_init__(self) -> None:
        objective, family = self.train.objective, self.model.family
        if objective.startswith("igpt"):
            require(
                family == "igpt",
                "train.objective",
                objective,
                f"needs an igpt model, not {self.model.name}",
            )
            causal = objective == "igpt-ar"
            require(
                self.model.causal == causal,
                "model.causal",
                self.model.causal,
                f"must be {causal} for {objective} (causal attention is for the autoregressive objective)",
            )
        else:
            require(
                self.model.num_classes > 0,
                "model.num_classes",
                self.model.num_classes,
                f"must be > 0 for the {objective} objective",
            )
        if self.train.mixup or self.train.cutmix:
            require(
                objective == "supervised" and self.model.family != "igpt", "train.mixup",
                self.train.mixup, "mixes images for the supervised objective only",
            )  # fmt: skip
        if self.optim.name == "sgd":
            require(
                not self.deepspeed.offload_optimizer, "deepspeed.offload_optimizer", True,
                "runs DeepSpeed's CPU Adam; it cannot step optim.name sgd",
            )  # fmt: skip
        if self.train.teacher:
            require(
                objective == "supervised" and getattr(self.model, "distilled", False),
                "train.teacher", self.train.teacher,
                "needs train.objective supervised and a distilled ViT (model.distilled: true, "
                f"e.g. deit-ti16); got {objective} and {self.model.name}",
            )  # fmt: skip
        if self.train.sync_batchnorm:
            require(
                getattr(self.model, "batchnorm", False), "train.sync_batchnorm", True,
                f"needs a model with BatchNorm; {self.model.name} has none",
            )  # fmt: skip
        if objective == "supervised-sigmoid":  # the trainer sets the bias from train.head_bias
            require(
                self.model.head_bias in (0.0, self.train.head_bias),
                "model.head_bias",
                self.model.head_bias,
                f"is ignored by supervised-sigmoid, which starts the head at train.head_bias="
                f"{self.train.head_bias:g}; "
                "set train.head_bias instead",
            )
        require(
            self.train.steps > self.optim.warmup_steps,
            "optim.warmup_steps",
            self.optim.warmup_steps,
            f"must be below train.steps={self.train.steps}",
        )
        require(
            self.finetune.report_split not in (self.data.train_split, self.data.val_split),
            "finetune.report_split",
            self.finetune.report_split,
            f"is read once for the final report: it cannot be data.train_split "
            f"({self.data.train_split}) or data.val_split ({self.data.val_split}), which "
            "training reads",
        )
        require(
            self.data.storage_deadline_s < self.train.collective_timeout_s,
            "data.storage_deadline_s",
            self.data.storage_deadline_s,
            f"must be below train.collective_timeout_s={self.train.collective_timeout_s:g}: "
            "the other ranks wait for a rank's retries in a collective",
        )
        micro = self.deepspeed.micro_batch_size
        require(
            micro == 0 or self.train.global_batch_size % micro == 0,
            "deepspeed.micro_batch_size",
            micro,
            f"must divide train.global_batch_size={self.train.global_batch_size}",
        )


# ---------------------------------------------------------------------------------------------
# Loading


class _Source:
    """Says where a key came from: the file, or the --set option that last wrote it."""

    def __init__(self, path: str, overrides: dict[str, str]) -> None:
        self.path, self.overrides = path, overrides

    def of(self, key: str) -> str:
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")  # prepare[0].x is --set prepare.0.x
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.overrides:
                return f"--set {prefix}={self.overrides[prefix]}"
        return self.path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {key}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, src: _Source) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return src.error(key, f"got {value!r} ({type(value).__name__}); expected {expected}")

    if tp is ModelConfig:
        return _build_model(value, key, src)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if origin is Literal:
        if value not in args:
            raise bad(_type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, src)
            except ConfigError:
                continue
        raise bad(" or ".join(_type_name(a) for a in args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any string that is a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad(f"a list ({_type_name(tp)})")
        return [_coerce(args[0], v, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list ({_type_name(args[0])} each)")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", src) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(
            _coerce(a, v, f"{key}[{i}]", src)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {k: _coerce(args[1], v, f"{key}.{k}", src) for k, v in value.items()}
    raise TypeError(f"config field {key} has a type the loader does not know: {tp}")


def _check_keys(cls: type, data: Any, key: str, src: _Source, extra: Sequence[str] = ()) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)] + list(extra)
    where = key or "top level"
    if not isinstance(data, dict):
        raise src.error(where, f"expected a mapping with keys {allowed}; got {data!r}")
    for k in data:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            full = f"{key}.{k}" if key else str(k)
            raise src.error(full, f"unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _wrap_field_error(e: FieldError, section: str, src: _Source) -> ConfigError:
    key = e.field if "." in e.field or not section else f"{section}.{e.field}"
    return src.error(key, f"got {e.value!r}; {e.allowed}")


def _build(cls: type, data: Any, key: str, src: _Source) -> Any:
    _check_keys(cls, data, key, src)
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], value, f"{key}.{name}" if key else name, src)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise _wrap_field_error(e, key, src) from None
    except TypeError as e:  # a required field is missing
        raise src.error(key or "top level", str(e)) from None


def _build_model(data: Any, key: str, src: _Source) -> ModelConfig:
    if not isinstance(data, dict) or "name" not in data:
        raise src.error(key, f"needs a 'name', one of: {', '.join(list_models())}")
    name = data["name"]
    try:
        base = model_config(name)
    except KeyError as e:
        raise src.error(f"{key}.name", e.args[0]) from None
    _check_keys(type(base), data, key, src)
    hints = typing.get_type_hints(type(base))
    overrides = {k: _coerce(hints[k], v, f"{key}.{k}", src) for k, v in data.items() if k != "name"}
    try:
        return dataclasses.replace(base, **overrides)
    except FieldError as e:
        raise _wrap_field_error(e, key, src) from None


def _apply_override(raw: dict, item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw

    def step(node: Any, part: str, i: int) -> tuple[Any, Any]:
        """(container, key) for one part: a section's key, or a list's index (prepare.0.source)."""
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {item}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                    f"{part!r} is not an index in it"
                )
            return node, int(part)
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {'.'.join(parts[:i])} is not a section")
        return node, part

    for i, part in enumerate(parts[:-1]):
        container, k = step(node, part, i)
        if isinstance(container, dict):
            container.setdefault(k, {})
        node = container[k]
    container, k = step(node, parts[-1], len(parts) - 1)
    container[k] = yaml.safe_load(text) if text.strip() else ""
    return ".".join(parts), text


def parse_config(raw: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> RunConfig:
    """A mapping (as read from YAML) plus KEY=VALUE overrides -> a checked RunConfig."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level; got {raw!r}")
    applied = dict(_apply_override(raw, item) for item in overrides)
    src = _Source(source, applied)
    if "model" not in raw:
        raise src.error(
            "model", f"is required: a mapping with a 'name', one of: {', '.join(list_models())}"
        )
    return _build(RunConfig, raw, "", src)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently,
    so a second `train:` would drop the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice, on lines {seen[key]} and {line}",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `--set` overrides."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw, str(path), overrides)


def config_to_raw(cfg: RunConfig) -> dict[str, Any]:
    """A RunConfig as plain data that `parse_config` reads back to an equal config."""
    raw = dataclasses.asdict(cfg)
    model = config_to_dict(cfg.model)
    model.pop("family")
    raw["model"] = model

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(raw)
