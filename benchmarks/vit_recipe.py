"""Quickstart ViT recipes: Fashion-MNIST test top-1 of variants of one config, side by side.

    .venv/bin/python benchmarks/vit_recipe.py [--config configs/quickstart-vit.yaml]
        [--variant "model.patch_size=6 model.image_size=30" ...] [--steps N] [--parallel 2]

The baseline is the config itself; each --variant adds `--set`-style overrides to it. Every
variant trains in its own process on one core, `--parallel` at a time, through Tessera's model,
objective and DeepSpeed engine: the config's precision, ZeRO stage, optimizer and schedule, at one
rank with the config's global batch. The data are Fashion-MNIST's 60,000 training images held
in memory, reshuffled every epoch and resized as the stream resizes them (antialiased bilinear)
when model.image_size is not 28; the score is top-1 on the 10,000 test images. The IDX files
are read from /usr/share/datasets/fashion-mnist, or from the folder in $FASHION_MNIST.

What differs from `tessera run`: no shards and no loader (the data are not what is compared),
one rank instead of two (the same global batch), activation checkpointing off (the same
numbers; its recomputation made the quickstart ViT's step 1.37x slower, profiled once, not
measured here). At the quickstart's settings this gave 89.10% for the plain ViT, where
`tessera run` gave 89.14% and 89.21%, and 90.68% for the hybrid, where it gave 90.79%: the study
ranks recipes in less than half the machine time of real runs (for the plain ViT, this script's
314 s on one core; the quickstart's training log, 350 s on two).
Data augmentation is the stream's and is not reproduced here.

Prints one row per variant (top-1, its difference to the baseline, seconds, images/s) and ends
with a JSON line: {"top1": {...}, "top1_vs_baseline": {...}, "images_per_s": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def images(source, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pixels (N, 1, size, size), labels (N,)) of one split of an IDX source."""
    x = torch.from_numpy(source.arrays[split].copy()).unsqueeze(1)
    labels = torch.tensor([r.labels[0] for r in source.splits[split]])
    if size != x.shape[-1]:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x, labels


def train_one(config: str, overrides: list[str], steps: int) -> dict:
    """Trains one variant in this process; returns its top-1 and timing."""
    from pipeline.config import load_config
    from pipeline.data.sources import idx_source
    from pipeline.data.transforms import model_input
    from pipeline.models import create_model
    from pipeline.train.engine import build_engine, init_distributed
    from pipeline.train.objectives import OBJECTIVES, class_logits

    overrides = [*overrides, "model.grad_checkpointing=false"]
    if steps:
        overrides.append(f"train.steps={steps}")
    run = load_config(config, overrides)
    init_distributed(log=lambda *_: None)
    torch.manual_seed(run.train.seed)
    head = {"head_bias": run.train.head_bias} if run.train.objective == "supervised-sigmoid" else {}
    engine = build_engine(create_model(run.model, **head), run, 1, run.train.steps)[0]
    dtype = next(engine.module.parameters()).dtype  # as the trainer casts its inputs
    objective = OBJECTIVES[run.train.objective]

    source = idx_source(os.environ.get("FASHION_MNIST", FASHION_MNIST))
    x, y = images(source, "train", run.model.image_size)
    batch, order = run.train.global_batch_size, torch.Generator().manual_seed(run.train.seed)
    perm, pos = torch.randperm(len(x), generator=order), 0
    start = time.perf_counter()
    for _ in range(run.train.steps):
        if pos + batch > len(x):  # a new epoch, reshuffled; the ragged tail is dropped
            perm, pos = torch.randperm(len(x), generator=order), 0
        idx = perm[pos : pos + batch]
        pos += batch
        loss, _ = objective(engine, {"image": model_input(x[idx]).to(dtype), "label": y[idx]})
        engine.backward(loss)
        engine.step()
    seconds = time.perf_counter() - start

    engine.eval()
    x, y = images(source, "test", run.model.image_size)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            logits = class_logits(engine, {"image": model_input(x[i : i + 1000]).to(dtype)})
            correct += int((logits.argmax(-1) == y[i : i + 1000]).sum())
    return {
        "top1": 100 * correct / len(x),
        "seconds": seconds,
        "images_per_s": run.train.steps * batch / seconds,
    }


def launch(config: str, variant: str, steps: int) -> dict:
    """One variant in a fresh one-thread process (its own process group and port)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", variant, "--config", config, "--out", out]
        cmd += ["--steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TESSERA_ROOT": str(ROOT)}
        env.pop("MASTER_PORT", None)  # init_distributed picks a free one
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        result = Path(out, "result.json")
        if proc.returncode != 0 or not result.exists():
            sys.exit(f"variant {variant!r} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart-vit.yaml")
    parser.add_argument("--variant", action="append", default=[], help="overrides, space-separated")
    parser.add_argument(
        "--steps", type=int, default=0, help="train.steps for all (0: the config's)"
    )
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        torch.set_num_threads(1)
        result = train_one(args.config, args.child.split(), args.steps)
        Path(args.out, "result.json").write_text(json.dumps(result))
        return

    variants = ["", *args.variant]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda v: launch(args.config, v, args.steps), variants))
    base = results[0]["top1"]
    names = [v or "baseline" for v in variants]
    print(f"{args.config}, Fashion-MNIST test top-1, one core per variant")
    print(f"{'variant':<56} {'top-1 %':>8} {'vs base':>8} {'seconds':>8} {'images/s':>9}")
    for name, r in zip(names, results, strict=True):
        print(
            f"{name:<56} {r['top1']:>8.2f} {r['top1'] - base:>+8.2f} "
            f"{r['seconds']:>8.0f} {r['images_per_s']:>9.0f}"
        )
    figures = {
        "top1": {n: round(r["top1"], 2) for n, r in zip(names, results, strict=True)},
        "top1_vs_baseline": {
            n: round(r["top1"] - base, 2) for n, r in zip(names[1:], results[1:], strict=True)
        },
        "images_per_s": {n: round(r["images_per_s"]) for n, r in zip(names, results, strict=True)},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
