"""GPU check: the bf16 matmul roof, then ViT-H/14 and iGPT-L training steps, against `tessera plan`.

    python benchmarks/gpu_check.py                 # one GPU, about 5 minutes
    python benchmarks/gpu_check.py --smoke         # tiny models, any device: checks the script
    python benchmarks/gpu_check.py --rehearse      # `tessera pretrain` itself: kill, resume, MFU
    python benchmarks/gpu_check.py --rehearse --smoke   # the same with tiny models, on a CPU

Each measurement runs in its own process (so peak memory is that case's alone) through
Tessera's own engine: the model built as the trainer builds it, DeepSpeed bf16 at ZeRO-0 on one
device, fused attention (PyTorch's scaled_dot_product_attention), AdamW with its fp32 master
weights, synthetic batches already on the device (this measures the step, not the loader):
  roof          bf16 matmul FLOP/s (best of square sizes 4096, 8192)
  vit-h14       ViT-H/14 at 224 px, batch --vit-batch, activation checkpointing off and on
  igpt-l        iGPT-L at 32x32 (1025 tokens, 512 colours), batch --igpt-batch, checkpointing off
For each: images/s, tokens/s, MFU against the measured roof and against the device's nominal
dense bf16 peak (analytic model FLOPs, the count the training log uses; the recomputation of
checkpointing is not counted), and peak allocated memory next to `tessera plan`'s total.
Target (issue 8): ViT-H/14 at >= 50% MFU of the nominal peak on an H100/H200-class GPU.

--rehearse runs the real thing instead: `tessera build-ops` (DeepSpeed's CUDA ops), then for
ViT-B/16 (224 px) and iGPT-S (32x32, 512 colours) `tessera pretrain` on synthetic shards written
on the spot (the GPU machine has no network), one rank with NCCL, the loader's workers, bf16
ZeRO-1, 60 steps (12 with --smoke), a checkpoint every 20 (4): killed (SIGKILL) once its first
checkpoint is complete, resumed with the same command (from the newest complete checkpoint,
which may be the second: they finish behind training), trained to the end. It reports the step
it resumed at, images/s and MFU from the training log
(against the matmul roof the trainer measures), peak memory and the checkpoint's size. About 5
minutes on one H200, the op build included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

NOMINAL_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def nominal_peak(device_name: str, given: float) -> float:
    """Dense bf16 FLOP/s from --peak-tflops, or from the device's name."""
    if given:
        return given * 1e12
    for name, tflops in NOMINAL_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return 0.0


def run_config(name: str, batch: int, checkpointing: bool, smoke: bool):
    from pipeline.config import parse_config

    model = {"name": name, "grad_checkpointing": checkpointing}
    if smoke:
        model["image_size"] = 16 if name.startswith("vit") else 8
    objective = "supervised" if name.startswith("vit") else "igpt-ar"
    return parse_config(
        {
            "model": model,
            "train": {"objective": objective, "global_batch_size": batch, "steps": 1000},
            "deepspeed": {"zero_stage": 0, "precision": "bf16"},
            "optim": {"grad_clip": 1.0},
        },
        "gpu_check",
    )


def role_roof(args: argparse.Namespace) -> dict:
    from pipeline.train.trainer import measure_peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (256, 512) if args.smoke else (4096, 8192)
    roof = max(measure_peak_flops(torch.bfloat16, device, seconds=2.0, n=n) for n in sizes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    memory = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 0
    return {"roof_flops": roof, "device": name, "memory": memory}


def role_step(args: argparse.Namespace) -> dict:
    from pipeline.models import create_model
    from pipeline.plan import Device, make_plan
    from pipeline.train.engine import build_engine, init_distributed, model_init_context
    from pipeline.train.objectives import OBJECTIVES

    init_distributed(log=lambda *_: None)
    run = run_config(args.model, args.batch, args.checkpointing, args.smoke)
    torch.manual_seed(0)
    with model_init_context(run, 1):
        model = create_model(run.model)
    engine = build_engine(model, run, 1, run.train.steps)[0]
    device, cfg = engine.device, run.model
    if cfg.family == "vit":
        shape = (args.batch, cfg.channels, cfg.image_size, cfg.image_size)
        batch = {"image": torch.randn(shape, device=device, dtype=torch.bfloat16),
                 "label": torch.randint(0, cfg.num_classes, (args.batch,), device=device)}  # fmt: skip
    else:
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), device=device)
        batch = {"tokens": tokens}
    objective = OBJECTIVES[run.train.objective]

    def step() -> None:
        loss, _ = objective(engine, batch, mask_prob=0.15)
        engine.backward(loss)
        engine.step()

    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    memory = torch.cuda.get_device_properties(0).total_memory if cuda else 80e9
    plan = make_plan(run, Device(1, memory, 1e15, 0.4))
    return {
        "step_s": seconds,
        "model_flops": cfg.train_flops() * args.batch / seconds,
        "images_per_s": args.batch / seconds,
        "tokens_per_s": args.batch * cfg.num_tokens / seconds,
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else 0,
        "plan_memory": plan.memory.total,
    }


ROLES = {"roof": role_roof, "step": role_step}


# ---------------------------------------------------------------------------------------------
# --rehearse: `tessera pretrain` itself, killed and resumed

STEP_LINE = re.compile(r"^step (\d+)/\d+ loss (\S+).* ([0-9.]+) img/s MFU ([0-9.]+)%", re.M)


def synthetic_dataset(url: str, image_size: int, channels: int, n: int) -> None:
    """n smooth random images (they compress like photos, not like noise) with 10 labels."""
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import ArraySource

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (n, image_size // 8, image_size // 8, channels), np.uint8)
    images = coarse.repeat(8, axis=1).repeat(8, axis=2)
    images = images[..., 0] if channels == 1 else images
    source = ArraySource.from_arrays(
        "synthetic", "synthetic", {"train": (images, rng.integers(0, 10, n))},
        [str(c) for c in range(10)],
    )  # fmt: skip
    prepare(source, url, PrepareOptions(samples_per_shard=256, executor="local", progress=False))


def rehearsal_config(folder: Path, name: str, smoke: bool, workers: int) -> Path:
    vit = name.startswith("vit")
    size = (16 if vit else 8) if smoke else (224 if vit else 32)
    channels = 1 if smoke else 3
    data = folder / "data"
    if not data.exists():
        synthetic_dataset(str(data), size, channels, 96 if smoke else 1024)
    model: dict = {"name": name, "image_size": size}
    palette: dict = {}
    if vit:
        model.update(channels=channels, num_classes=10)
    else:  # 3 bits per channel: iGPT's 512 colours; grey levels for the smoke test
        palette = {"palette": "grey", "palette_size": 16} if smoke else {"palette": "uniform"}
        model["vocab_size"] = 16 if smoke else 512
    raw = {
        "model": model,
        "data": {"url": str(data), "workers": workers, "augment": "vit" if vit else "none",
                 **palette},
        "train": {"objective": "supervised" if vit else "igpt-ar", "steps": 12 if smoke else 60,
                  "global_batch_size": (8 if smoke else 128) if vit else (8 if smoke else 32),
                  "output": str(folder / "run")},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 1, "precision": "bf16"},
        "checkpoint": {"every_steps": 4 if smoke else 20, "keep_last": 2},
        "logging": {"every_steps": 1, "images_every_steps": 0},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tessera(*args: str, kill_when: Path | None = None, timeout: float = 600) -> tuple[int, str]:
    """`tessera ARGS` in its own process group; SIGKILLed (the whole group, a crashed node)
    once `kill_when` exists. (exit status, output)."""
    cmd = [str(Path(sys.executable).with_name("tessera")), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while kill_when is not None and proc.poll() is None and not kill_when.exists():
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if kill_when is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0] + f"\n(killed after {timeout:.0f}s)"
    return proc.returncode, out


def rehearse_one(name: str, smoke: bool, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = rehearsal_config(folder, name, smoke, workers)
        every = 4 if smoke else 20
        first = folder / "run" / "checkpoints" / f"step-{every:07d}" / "COMPLETE"
        start = time.perf_counter()
        code, out1 = tessera("pretrain", str(config), kill_when=first)
        killed_after = time.perf_counter() - start
        if not first.exists():
            return {"error": f"no checkpoint before the kill (exit {code}): {out1[-400:]}"}
        # Checkpoints finish behind training: the next one may have completed too before the
        # kill landed (a tiny model's in a few milliseconds); the resume must find the newest.
        complete = [
            int(c.parent.name.split("-")[1]) for c in first.parents[1].glob("step-*/COMPLETE")
        ]
        code, out2 = tessera("pretrain", str(config))
        if code != 0:
            return {"error": f"the resumed run failed (exit {code}): {out2[-600:]}"}
        resumed = re.search(r"resumed from \S+ at step (\d+)", out2)
        steps = [(int(s), float(loss), float(ips), float(mfu))
                 for s, loss, ips, mfu in STEP_LINE.findall(out2)]  # fmt: skip
        timed = steps[len(steps) // 2 :] or steps  # past the warm-up
        ckpt = folder / "run" / "checkpoints" / f"step-{3 * every:07d}"
        return {
            "resumed_at": int(resumed.group(1)) if resumed else None,
            "complete_at_kill": max(complete),
            "killed_after_s": killed_after,
            "steps_after_resume": [s for s, *_ in steps],
            "final_loss": steps[-1][1] if steps else float("nan"),
            "images_per_s": statistics.median(r[2] for r in timed) if timed else 0.0,
            "mfu": statistics.median(r[3] for r in timed) / 100 if timed else 0.0,
            "checkpoint_gb": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e9,
        }


def rehearse(smoke: bool) -> None:
    start = time.perf_counter()
    code, out = tessera("build-ops")
    print(out.strip().splitlines()[-1] if out.strip() else "", f"(exit {code})")
    workers = 2 if smoke else 8
    names = ("vit-micro-p4", "igpt-micro") if smoke else ("vit-b16", "igpt-s")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; tessera pretrain, 1 rank, data.workers {workers}, bf16 ZeRO-1")
    print(f"{'model':<14}{'resumed at':>11}{'steps after':>13}{'img/s':>10}{'MFU':>8}"
          f"{'final loss':>12}{'ckpt GB':>9}")  # fmt: skip
    figures: dict = {"device": device}
    for name in names:
        r = rehearse_one(name, smoke, workers)
        if "error" in r:
            print(f"{name:<14}failed: {r['error'][:300]}")
            figures[f"{name}_error"] = r["error"][:300]
            continue
        after = r["steps_after_resume"]
        span = f"{after[0]}-{after[-1]}" if after else "-"
        print(f"{name:<14}{r['resumed_at']!s:>11}{span:>13}{r['images_per_s']:>10.1f}"
              f"{r['mfu']:>8.1%}{r['final_loss']:>12.4f}{r['checkpoint_gb']:>9.2f}")  # fmt: skip
        figures.update({f"{name}_{k}": v for k, v in r.items() if k != "steps_after_resume"})
    figures["wall_s"] = time.perf_counter() - start
    print(json.dumps(figures))


def measure(role: str, *extra: str) -> dict:
    """One measurement in a fresh process; its result, or the error it died of."""
    with tempfile.TemporaryDirectory() as out:
        me = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--out", out, *extra]
        proc = subprocess.run(me, capture_output=True, text=True)
        result = Path(out, "result.json")
        if proc.returncode == 0 and result.exists():
            return json.loads(result.read_text())
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"error": next((ln for ln in reversed(tail) if "Error" in ln), tail[-1] if tail else "")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--igpt-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="nominal dense bf16 peak")
    parser.add_argument("--smoke", action="store_true", help="tiny models: check the script")
    parser.add_argument(
        "--rehearse", action="store_true", help="run `tessera pretrain`: kill, resume, MFU"
    )
    parser.add_argument("--role", choices=list(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        result = ROLES[args.role](args)
        Path(args.out, "result.json").write_text(json.dumps(result))
        return
    if args.rehearse:
        rehearse(args.smoke)
        return

    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    timing += ["--smoke"] if args.smoke else []
    vit, igpt = ("vit-micro-p4", "igpt-micro") if args.smoke else ("vit-h14", "igpt-l")
    device = measure("roof", *timing)
    if "error" in device:
        sys.exit(f"the matmul roof failed: {device['error']}")
    roof, peak = device["roof_flops"], nominal_peak(device["device"], args.peak_tflops)
    cases = [
        (f"{vit} batch {args.vit_batch}", vit, args.vit_batch, False),
        (f"{vit} batch {args.vit_batch}, checkpointing", vit, args.vit_batch, True),
        (f"{igpt} batch {args.igpt_batch}", igpt, args.igpt_batch, False),
    ]
    nominal = f"{peak / 1e12:g} nominal" if peak else "nominal peak unknown (--peak-tflops)"
    print(f"device: {device['device']}, bf16 roof {roof / 1e12:.1f} TFLOP/s measured, {nominal}")
    header = (f"{'case':<38}{'img/s':>9}{'tokens/s':>11}{'MFU roof':>10}{'MFU peak':>10}"
              f"{'memory GB':>11}{'plan GB':>9}")  # fmt: skip
    print(header)
    figures: dict[str, float | str] = {"roof_tflops": roof / 1e12, "device": device["device"]}
    for label, name, batch, checkpointing in cases:
        extra = ["--model", name, "--batch", str(batch), *timing]
        r = measure("step", *extra, *(["--checkpointing"] if checkpointing else []))
        key = f"{name}{'_ckpt' if checkpointing else ''}"
        if "error" in r:
            print(f"{label:<38}failed: {r['error'][:80]}")
            figures[f"{key}_error"] = r["error"][:200]
            continue
        mfu_roof = r["model_flops"] / roof
        mfu_peak = r["model_flops"] / peak if peak else None
        print(f"{label:<38}{r['images_per_s']:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{mfu_roof:>10.1%}{f'{mfu_peak:.1%}' if peak else '-':>10}{r['peak_memory'] / 1e9:>11.1f}"
              f"{r['plan_memory'] / 1e9:>9.1f}")  # fmt: skip
        figures.update({f"{key}_images_per_s": r["images_per_s"], f"{key}_mfu_roof": mfu_roof,
                        f"{key}_mfu_peak": mfu_peak, f"{key}_memory_gb": r["peak_memory"] / 1e9,
                        f"{key}_plan_gb": r["plan_memory"] / 1e9})  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
