"""`tessera` commands: each parses its arguments, loads a config and calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import yaml

from pipeline.config import config_to_raw, load_config
from pipeline.data.shards import DatasetError
from pipeline.data.sources import FORMATS, SourceError
from pipeline.errors import (
    EXIT_PREEMPTED,
    EXIT_STORAGE,
    ConfigError,
    CorruptCheckpoint,
    Preempted,
    RunLeased,
    StorageUnavailable,
    UnsafeCheckpoint,
)
from pipeline.models import create_model, list_models, model_config
from pipeline.models.registry import FAMILIES, PAPER_PARAMS


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)",
    )


def models_table(names: Sequence[str]) -> list[str]:
    """One line per named size: name, parameters (and the paper's count, where it gives one),
    image size, what the last block outputs (tokens, or a CNN's feature map), training
    GFLOPs per image."""
    head = f"{'name':<18} {'params':>14} {'paper':>8} {'image':>6} {'states':>7} {'train GFLOPs/img':>17}"
    lines = [head]
    for name in names:
        with torch.device("meta"):  # counts without allocating, even for iGPT-XL
            model = create_model(name)
        cfg = model.cfg
        params = sum(p.numel() for p in model.parameters())
        paper = f"{PAPER_PARAMS[name] / 1e6:.1f}M" if name in PAPER_PARAMS else "-"
        states = (
            str(cfg.num_tokens)
            if hasattr(cfg, "num_tokens")
            else f"{cfg.final_side}x{cfg.final_side}"
        )
        lines.append(
            f"{name:<18} {params:>14,d} {paper:>8} {cfg.image_size:>6d} {states:>7} "
            f"{cfg.train_flops() / 1e9:>17.2f}"
        )
    return lines


def cmd_models(args: argparse.Namespace) -> None:
    names = [n for n in list_models() if not args.family or model_config(n).family == args.family]
    print("\n".join(models_table(names)))


def cmd_config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_raw(cfg), sort_keys=False), end="")


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.data.prepare import PrepareOptions, parse_size, prepare
    from pipeline.data.sources import open_source

    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError as e:
        raise SourceError(f"--shard-size: {e}") from None
    source = open_source(args.source, args.format, args.endpoint_url)
    opts = PrepareOptions(
        seed=args.seed,
        shard_bytes=shard_bytes,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        palette_size=args.palette,
        pixels=args.pixels,
        executor="local" if args.local else "ray",
        ray_address=args.ray_address,
        endpoint_url=args.endpoint_url,
    )
    manifest = prepare(source, args.output, opts)
    for name, split in manifest.splits.items():
        print(f"{args.output}: {name}: {split.samples:,} samples in {len(split.shards)} shards")
    if manifest.skipped:
        print(f"{len(manifest.skipped)} source items left out (listed in dataset.json 'skipped'):")
        for item in manifest.skipped[:10]:
            print(f"  {item['key']}: {item['reason']}")


def cmd_index(args: argparse.Namespace) -> None:
    from pipeline.data.prepare import index_shards, verify_shards

    if args.verify:
        checked = verify_shards(args.url, args.endpoint_url)
        print(f"{args.url}: {checked} shards match their size and sha256 in the manifest")
        return
    manifest = index_shards(args.url, args.split, args.endpoint_url)
    split = manifest.splits[args.split]
    print(f"{args.url}: {args.split}: {split.samples:,} samples in {len(split.shards)} shards")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pipeline.train.trainer import pretrain

    run = load_config(args.config, args.overrides)
    pretrain(run, resume=args.resume or run.checkpoint.resume, restart=args.restart)


def cmd_finetune(args: argparse.Namespace) -> None:
    from pipeline.train.finetune import finetune

    run = load_config(args.config, args.overrides)
    finetune(run, resume=args.resume or run.checkpoint.resume, restart=args.restart)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluate.results import RESULTS_MD, read_markdown
    from pipeline.evaluate.run import evaluate, watch

    run = load_config(args.config, [*args.overrides, *(["eval.final=true"] if args.final else [])])
    if args.watch and run.eval.final:
        raise ConfigError("--watch reports every checkpoint: it cannot be the final report")
    if args.watch:
        watch(run, poll=args.poll, idle_timeout=args.idle_timeout)
    else:
        evaluate(run, args.model)
    if os.environ.get("RANK", "0") != "0":  # under a launcher: rank 0 reports
        return
    table = read_markdown(run.train.output, run.data.endpoint_url)
    if table:
        print(f"\n{run.train.output}/{RESULTS_MD}:\n\n{table}", end="")


def cmd_run(args: argparse.Namespace) -> None:
    from pipeline.config import parse_config
    from pipeline.orchestrate.job import absolute_paths, run_job

    root = args.root or os.environ.get("TESSERA_ROOT") or os.getcwd()
    jobs = []  # every config is checked before the first one starts
    for path in args.configs:
        run = load_config(path, args.overrides)
        jobs.append(parse_config(absolute_paths(config_to_raw(run), root), source=path))
    for run in jobs:
        run_job(run)


def cmd_plan(args: argparse.Namespace) -> None:
    from pipeline.plan import Device, make_plan, parse_bytes, report

    run = load_config(args.config, args.overrides)
    try:
        memory = parse_bytes(args.gpu_memory)
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None
    if args.gpus < 1 or args.peak_tflops <= 0 or not 0 < args.mfu <= 1:
        raise ConfigError("--gpus must be >= 1, --peak-tflops > 0 and --mfu in (0, 1]")
    print(report(make_plan(run, Device(args.gpus, memory, args.peak_tflops * 1e12, args.mfu))))


def cmd_build_ops(args: argparse.Namespace) -> None:
    from pipeline.train.engine import build_ops

    build_ops()


def cmd_export(args: argparse.Namespace) -> None:
    from pipeline.train.export import export

    ckpt, model = export(args.source, args.output, args.endpoint_url)
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {ckpt} ({model.cfg.name}, {params:,} parameters) to {args.output}")


def _add_restart_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--restart", action="store_true",
        help="start over (with --resume never, or from an older checkpoint) in a run folder "
        "that has newer checkpoints: they are moved aside to checkpoints.before-restart-TIME, "
        "never deleted (local run folders)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations at the top: `prepare --local` must not read as a prefix of --local_rank.
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__, allow_abbrev=False)
    # The deepspeed launcher (without --no_local_rank) and torch.distributed.launch put
    # --local_rank=N before the command; ranks read LOCAL_RANK from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named model sizes")
    p.add_argument("--family", choices=list(FAMILIES), help="only this family")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "config", help="check a run config and print it with every default filled in"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="write a source as WebDataset shards + manifest")
    p.add_argument(
        "source",
        help="IDX folder, image folder, `digits`, JSONL file, CIFAR binary folder, downsampled "
        "ImageNet .npz folder, or ImageNet's train/ + val/ (path or URL)",
    )
    p.add_argument("output", help="dataset URL: a path, file://, s3://bucket/prefix, memory://")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--seed", type=int, default=0, help="sample order; same seed, same bytes")
    p.add_argument("--shard-size", default="64MB", help="target tar size (default 64MB)")
    p.add_argument("--samples-per-shard", type=int, default=0, help="fixed count instead of a size")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="carve a 'val' split out of 'train'"
    )
    p.add_argument(
        "--palette", type=int, default=0, metavar="K", help="fit a K-colour palette (iGPT)"
    )
    p.add_argument(
        "--pixels",
        default="encoded",
        choices=["encoded", "raw"],
        help="raw: store decoded uint8 pixels, read without a decoder (small images of one size: "
        "28 px Fashion-MNIST streams 2.2x faster, its shards 1.1x the size of PNG shards)",
    )
    p.add_argument(
        "--local", action="store_true", help="write shards in this process, not Ray tasks"
    )
    p.add_argument(
        "--ray-address", default="", help="Ray cluster (default: RAY_ADDRESS, else local)"
    )
    p.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a model (any launcher: none, deepspeed, torchrun)")
    _add_config_args(p)
    p.add_argument(
        "--resume", default="", help="auto (newest complete checkpoint), never, or a path"
    )
    _add_restart_arg(p)
    p.set_defaults(func=cmd_pretrain, hard_exit=True)

    p = sub.add_parser(
        "finetune", help="train from pretrained weights (finetune.init), then report top-1"
    )
    _add_config_args(p)
    p.add_argument("--resume", default="", help="auto, never, or a checkpoint path")
    _add_restart_arg(p)
    p.set_defaults(func=cmd_finetune, hard_exit=True)

    p = sub.add_parser(
        "evaluate", help="linear probe, few-shot, kNN, finetune and pixel baseline -> results.md"
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        default="",
        help="exported model, checkpoint or run (default: the run's newest checkpoint); "
        "`untrained`: the same network at its initialisation, the baseline pretraining must beat",
    )
    p.add_argument(
        "--watch", action="store_true", help="evaluate each new checkpoint as training writes it"
    )
    p.add_argument(
        "--final", action="store_true",
        help="the final report, on the test split (default: val, where choices are made)",
    )  # fmt: skip
    p.add_argument("--poll", type=float, default=10.0, help="--watch: seconds between looks")
    p.add_argument(
        "--idle-timeout", type=float, default=3600.0,
        help="--watch: stop after this many seconds without a new checkpoint",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate, hard_exit=True)

    p = sub.add_parser(
        "export", help="checkpoint -> safetensors + model config (no DeepSpeed needed)"
    )
    p.add_argument("source", help="a run folder (its newest complete checkpoint) or a checkpoint")
    p.add_argument("output", help="folder URL for model.safetensors + model.json")
    p.add_argument(
        "--endpoint-url", default="",
        help="S3 endpoint for s3:// source and output (default: AWS_ENDPOINT_URL, else AWS)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "run", help="the whole job: prepare, pretrain, export, finetune, evaluate (resumable)"
    )
    p.add_argument("configs", nargs="+", metavar="config", help="run configs, run in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field in every config (repeatable)")  # fmt: skip
    p.add_argument(
        "--root", default="",
        help="where relative paths in the config start (default: TESSERA_ROOT, else here)",
    )  # fmt: skip
    p.set_defaults(func=cmd_run, hard_exit=True)

    p = sub.add_parser(
        "plan", help="memory per GPU, step time and cost of a run config, before booking GPUs"
    )
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=8, help="devices the run is spread over")
    p.add_argument("--gpu-memory", default="80GB", help="memory per device, e.g. 80GB, 141GB")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0,
        help="dense bf16 peak per device (H100 SXM: 989, A100: 312)",
    )  # fmt: skip
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "build-ops", help="compile DeepSpeed's ops now (an image build step), not at first start"
    )
    p.set_defaults(func=cmd_build_ops)

    p = sub.add_parser(
        "index",
        help="make a manifest for WebDataset tars written by another tool, or --verify a dataset",
    )
    p.add_argument("url", help="folder of .tar shards")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read every shard of a dataset and check it against its manifest's sha256 (exit 2 "
        "naming each shard that differs)",
    )
    p.add_argument("--endpoint-url", default="")
    p.set_defaults(func=cmd_index)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if getattr(args, "hard_exit", False):
        # Training is over and every file is closed (checkpoints complete, TensorBoard flushed,
        # process group destroyed). Some native thread started by the communication stack can
        # still be alive, and Python's normal teardown then aborts the process ("terminate
        # called without an active exception"), turning a finished run into exit status -6.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except Preempted as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except StorageUnavailable as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except ConfigError as e:
        print(f"tessera: config error: {e}", file=sys.stderr)
        return 2
    except (
        DatasetError,
        SourceError,
        FileNotFoundError,
        UnsafeCheckpoint,
        CorruptCheckpoint,
        RunLeased,
    ) as e:
        print(f"tessera: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from pipeline.evaluate.run import EvalError

        if not isinstance(e, EvalError):
            raise
        print(f"tessera: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from pipeline.data.stream import DataError
        from pipeline.orchestrate.job import StageError
        from pipeline.train.trainer import NonFiniteError

        if not isinstance(e, (DataError, NonFiniteError, StageError)):
            raise
        print(f"tessera: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
