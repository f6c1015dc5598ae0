"""The lecture's experiment in miniature: ViT against CNNs (and Swin, PVT, DeiT) as data grows.

    .venv/bin/python benchmarks/data_scale.py [--sizes 1000 6000 55000] [--budget-tflop 5]
        [--models vit resnet swin pvt deit] [--lrs 2] [--parallel 2] [--out runs/data-scale]

Every model trains on Fashion-MNIST subsets of each size for the same training FLOPs
(`--budget-tflop`, model FLOPs by Tessera's analytic count, 3x forward; a smaller model takes
more steps; DeiT's teacher forwards are not counted), at batch 64 with AdamW, 5% warmup and
cosine decay, no augmentation, fp32, one core each, through Tessera's models, objectives and
DeepSpeed engine. Each gets at most two learning rates (`LRS`), chosen by top-1 on a validation
set of 5,000 images carved, stratified by class, from the 60,000 training images before any
subset is drawn (so the largest subset is 55,000); only the chosen run reads the test set, once.
DeiT is distilled (hard labels) from the ResNet chosen for the same subset. Subsets are
class-stratified draws, each smaller one inside the larger ones; one seed.

The lecture's crossover (ViT behind ResNets on ImageNet-1k, level on ImageNet-21k, ahead on JFT)
needs 14M-300M images; at 60k it cannot appear. The study reports the ordering that does
appear and how the gaps move with data.

Prints a table (test top-1 per model and size, the learning rate chosen, its validation top-1,
steps and epochs), writes `OUT/data_scale.png` (test top-1 against training images) and
`OUT/data_scale.json`, and ends with one JSON line: {"test_top1": {model: {size: %}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
VAL = 5000
BATCH = 64

# The 28-32 px sizes of each family (the stream would resize 28 -> 32 as `images` does here).
MODELS: dict[str, dict] = {
    "vit": {"name": "vit-tiny-p4", "image_size": 28, "width": 96, "heads": 3, "mlp_dim": 384},
    "resnet": {"name": "resnet-26-s", "image_size": 28},
    "swin": {"name": "swin-micro", "image_size": 32, "width": 32, "heads": (1, 2, 4, 8)},
    "pvt": {"name": "pvt-tiny-s", "image_size": 32},
    "deit": {"name": "deit-tiny-p4", "image_size": 28, "width": 96, "heads": 3, "mlp_dim": 384},
}
LRS = {"vit": (1e-3, 3e-3), "resnet": (1e-3, 3e-3), "swin": (1e-3, 3e-3), "pvt": (1e-3, 3e-3),
       "deit": (1e-3, 3e-3)}  # fmt: skip


def fashion_mnist(evaluated: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val", "test"}: (uint8 (N, 1, 28, 28), labels (N,)); val carved from train;
    `evaluated` > 0 keeps only that many (stratified) val and test images (a quick check)."""
    from pipeline.data.sources import idx_source

    source = idx_source(os.environ.get("FASHION_MNIST", FASHION_MNIST))
    out = {}
    for split in ("train", "test"):
        x = torch.from_numpy(source.arrays[split].copy()).unsqueeze(1)
        out[split] = (x, torch.tensor([r.labels[0] for r in source.splits[split]]))
    x, y = out["train"]
    order = stratified_order(y.numpy(), seed=0)
    val, rest = order[:VAL], order[VAL:]
    out["val"] = (x[val], y[val])
    out["train"] = (x[rest], y[rest])
    if evaluated:
        for split in ("val", "test"):
            x, y = out[split]
            keep = stratified_order(y.numpy(), seed=1)[:evaluated]
            out[split] = (x[keep], y[keep])
    return out


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation whose every prefix holds the classes in their proportions (round robin
    over per-class shuffles): prefixes are nested, class-stratified subsets."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    longest = max(len(p) for p in per_class)
    rows = [p[i] for i in range(longest) for p in per_class if i < len(p)]
    return np.array(rows)


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if size == x.shape[-1]:
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def run_config(family: str, lr: float, steps: int):
    from pipeline.config import parse_config

    model = {**MODELS[family], "channels": 1, "num_classes": 10}
    raw = {
        "model": model, "data": {"url": "/unused"},
        "train": {"steps": steps, "global_batch_size": BATCH, "seed": 0},
        "optim": {"lr": lr, "weight_decay": 0.05, "warmup_steps": steps // 20},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
    }  # fmt: skip
    return parse_config(raw, f"data_scale {family}")


def steps_for(family: str, budget_tflop: float) -> int:
    flops = run_config(family, 1e-3, 1).model.train_flops() * BATCH
    return max(1, int(budget_tflop * 1e12 / flops))


def top1(model, x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    from pipeline.data.transforms import model_input
    from pipeline.train.objectives import class_logits

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            images = model_input(resized(x[i : i + 1000], size))
            correct += int(
                (class_logits(model, {"image": images}).argmax(-1) == y[i : i + 1000]).sum()
            )
    return 100 * correct / len(x)


def train_one(
    family: str, size: int, lr: float, budget: float, out: Path, teacher: str, evaluated: int
) -> dict:
    """One run in this process: its validation top-1, and its weights saved for the caller."""
    from pipeline.data.transforms import model_input
    from pipeline.models import create_model, load_model, save_model
    from pipeline.train.engine import build_engine, init_distributed
    from pipeline.train.objectives import supervised

    data = fashion_mnist(evaluated)
    steps = steps_for(family, budget)
    run = run_config(family, lr, steps)
    init_distributed(log=lambda *_: None)
    torch.manual_seed(0)
    engine = build_engine(create_model(run.model), run, 1, steps)[0]
    model_teacher = None
    if teacher:
        model_teacher = load_model(teacher).eval().requires_grad_(False)
    x, y = data["train"]
    x, y = resized(x[:size], run.model.image_size), y[:size]
    gen = torch.Generator().manual_seed(0)
    perm, pos, start = torch.randperm(size, generator=gen), 0, time.perf_counter()
    batch = min(BATCH, size)
    for _ in range(steps):
        if pos + batch > size:
            perm, pos = torch.randperm(size, generator=gen), 0
        idx = perm[pos : pos + batch]
        pos += batch
        loss, _ = supervised(engine, {"image": model_input(x[idx]), "label": y[idx]},
                             teacher=model_teacher)  # fmt: skip
        engine.backward(loss)
        engine.step()
    seconds = time.perf_counter() - start
    val = top1(engine.module, *data["val"], run.model.image_size)
    save_model(engine.module, str(out / "model"))
    return {"val_top1": val, "steps": steps, "seconds": seconds,
            "epochs": steps * batch / size}  # fmt: skip


def launch(
    family: str, size: int, lr: float, budget: float, teacher: str, evaluated: int, work: str
) -> dict:
    """One run in a fresh one-thread process; its result and the path of its saved model (in
    `work`, which the study removes at its end)."""
    out = Path(tempfile.mkdtemp(prefix=f"{family}-{size}-", dir=work))
    task = [family, size, lr, budget, teacher, evaluated]
    cmd = [sys.executable, __file__, "--child", json.dumps(task), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0 or not (out / "result.json").exists():
        sys.exit(f"{family} at {size} (lr {lr}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {**json.loads((out / "result.json").read_text()), "lr": lr,
            "model": str(out / "model")}  # fmt: skip


def choose(
    families: list[str], size: int, args: argparse.Namespace, pool, teacher: str = ""
) -> dict[str, dict]:
    """Each family's runs at its learning rates, all side by side in the pool; per family the
    run with the best validation top-1."""
    tasks = [(f, lr) for f in families for lr in LRS[f][: args.lrs]]
    runs = list(pool.map(
        lambda t: launch(t[0], size, t[1], args.budget_tflop, teacher, args.eval_images, args.work),
        tasks,
    ))  # fmt: skip
    chosen: dict[str, dict] = {}
    for (family, _), run in zip(tasks, runs, strict=True):
        if family not in chosen or run["val_top1"] > chosen[family]["val_top1"]:
            chosen[family] = run
    return chosen


def plot(table: dict, path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for family, by_size in table.items():
        sizes = sorted(by_size)
        ax.plot(sizes, [by_size[s]["test_top1"] for s in sizes], marker="o", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("training images (Fashion-MNIST subset)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"same training budget per run: {budget:g} TFLOP")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000, 55000])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget-tflop", type=float, default=5.0)
    parser.add_argument("--lrs", type=int, default=2, choices=[1, 2])
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="runs/data-scale")
    parser.add_argument(
        "--eval-images", type=int, default=0, help="val and test images read (0: all; a check)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        torch.set_num_threads(1)
        family, size, lr, budget, teacher, evaluated = json.loads(args.child)
        result = train_one(family, size, lr, budget, Path(args.out), teacher, evaluated)
        Path(args.out, "result.json").write_text(json.dumps(result))
        return

    from pipeline.models import load_model

    if "deit" in args.models and "resnet" not in args.models:
        sys.exit("--models: deit is distilled from the resnet; list resnet too")
    data = fashion_mnist(args.eval_images)
    args.work = tempfile.mkdtemp(prefix="data-scale-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    table: dict[str, dict[int, dict]] = {}
    try:
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            for size in args.sizes:
                first = [m for m in args.models if m != "deit"]
                chosen = choose(first, size, args, pool)
                if "deit" in args.models:  # its teacher: the ResNet chosen at this size
                    chosen |= choose(["deit"], size, args, pool, chosen["resnet"]["model"])
                for family, r in chosen.items():
                    model = load_model(r["model"])
                    size_px = MODELS[family]["image_size"]
                    r["test_top1"] = top1(model, *data["test"], size_px)  # once, for the chosen run
                    table.setdefault(family, {})[size] = r
    finally:  # the runs' saved models
        shutil.rmtree(args.work, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60

    val, test = len(data["val"][1]), len(data["test"][1])
    print(f"Fashion-MNIST, {args.budget_tflop:g} TFLOP of training per run, batch {BATCH}, "
          f"lr chosen on {val} validation images, top-1 on {test} test images; "
          f"{minutes:.1f} min on {args.parallel} cores")  # fmt: skip
    print(f"{'model':<8} {'images':>7} {'test top-1':>11} {'lr':>7} {'val top-1':>10} "
          f"{'steps':>7} {'epochs':>7} {'train s':>8}")  # fmt: skip
    for family, by_size in table.items():
        for size, r in sorted(by_size.items()):
            print(f"{family:<8} {size:>7} {r['test_top1']:>11.2f} {r['lr']:>7.0e} "
                  f"{r['val_top1']:>10.2f} {r['steps']:>7} {r['epochs']:>7.1f} "
                  f"{r['seconds']:>8.0f}")  # fmt: skip
    plot(table, out / "data_scale.png", args.budget_tflop)
    figures = {
        "test_top1": {f: {str(s): round(r["test_top1"], 2) for s, r in b.items()}
                      for f, b in table.items()},
        "chosen_lr": {f: {str(s): r["lr"] for s, r in b.items()} for f, b in table.items()},
        "budget_tflop": args.budget_tflop,
        "minutes": round(minutes, 1),
    }  # fmt: skip
    (out / "data_scale.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
