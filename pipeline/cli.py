"""`tessera` commands: each parses its arguments, loads a config and calls one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import yaml

from pipeline.config import config_to_raw, load_config
from pipeline.errors import ConfigError
from pipeline.models import create_model, list_models


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
    """One line per named size: name, parameters, image size, tokens, training GFLOPs/image."""
    lines = [f"{'name':<14} {'params':>14} {'image':>6} {'tokens':>7} {'train GFLOPs/img':>17}"]
    for name in names:
        with torch.device("meta"):  # counts without allocating, even for iGPT-XL
            model = create_model(name)
        cfg = model.cfg
        params = sum(p.numel() for p in model.parameters())
        lines.append(
            f"{name:<14} {params:>14,d} {cfg.image_size:>6d} {cfg.num_tokens:>7d} "
            f"{cfg.train_flops() / 1e9:>17.2f}"
        )
    return lines


def cmd_models(args: argparse.Namespace) -> None:
    names = [n for n in list_models() if not args.family or n.startswith(args.family)]
    print("\n".join(models_table(names)))


def cmd_config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_raw(cfg), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named model sizes")
    p.add_argument("--family", choices=["vit", "igpt"], help="only this family")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "config", help="check a run config and print it with every default filled in"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"tessera: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
