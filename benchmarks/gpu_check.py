"""GPU check: the bf16 matmul roof, then ViT-H/14 and iGPT-L training steps, against `tessera plan`.

    python benchmarks/gpu_check.py                 # one GPU, about 5 minutes
    python benchmarks/gpu_check.py --smoke         # tiny models, any device: checks the script

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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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
