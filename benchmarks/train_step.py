"""Training step: MFU against this machine's matmul roof, memory, ZeRO sharding, checkpoint I/O.

    .venv/bin/python benchmarks/train_step.py [--steps 4]

Each figure is measured in its own process (so peak memory is that measurement's alone), all
from this one run, and printed side by side:
  roof          bf16 matmul FLOP/s of this machine (the best of square sizes 1024-3072)
  mfu           a ViT-S/16 (224 px) training step through Tessera's DeepSpeed engine (bf16,
                ZeRO-0, one process): analytic model FLOPs / step time / roof
  activations   the CPU allocator's peak during that step's forward and backward (the
                profiler's memory events, as tests/test_plan.py measures the plan), activation
                checkpointing off and on
  zero          per-rank memory of model + gradients + optimizer states for a ViT-B (86M
                parameters) at 2 ranks, ZeRO-3 against ZeRO-0: the bytes of live tensors
                between backward and the optimizer step (where they peak), and resident memory
                after the first step (which also holds what the allocator kept after frees),
                each above the same for a 60K-parameter model (DeepSpeed's fixed buffers cancel)
  attention     one attention layer's forward + backward in bf16 on one core, PyTorch's fused
                scaled_dot_product_attention against the explicit softmax(QK^T)V that Tessera uses
                on CPU in bf16, at the quickstart's shapes and ViT-S/16's
  checkpoint    bytes/s of the engine writing a ViT-B checkpoint against one plain sequential
                write of the same number of bytes to the same disk
  publish       (also alone: --only publish) `tessera pretrain` of a 21M-parameter ViT to an
                s3:// run on moto (loopback), --publish-steps steps with a checkpoint every
                --publish-every, wall time of Trainer.train(), four ways, interleaved,
                --repeats times: checkpoints finished behind training (the default: staged in
                memory where it has room), the same staged on disk (checkpoint.staging: disk),
                finished before training goes on (checkpoint.background false), and none but
                the last (which every way ends with). "Training stood": the training thread's
                time in the checkpoints before the last (Trainer.blocked_at); the figure is
                behind's over before's. Wall time is shown too: on a machine whose cores both
                train, the work behind training still takes CPU from it
  pull          a resume's download of that run's newest checkpoint (runs.pull_checkpoint, 8
                files at a time) against s3fs's own concurrent recursive get
Targets (issue 4, 2-core CPU): MFU >= 35% of the roof; ZeRO-3 <= 0.55x ZeRO-0 per rank;
checkpoint write >= 0.5x a sequential write. Issue 22: publishing behind training blocks <= 10%
of what publishing before it does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def run_config(model: dict, zero: int, batch: int, world: int = 1):
    from pipeline.config import parse_config

    return parse_config(
        {
            "model": model,
            "train": {"global_batch_size": batch * world, "steps": 1000},
            "deepspeed": {"zero_stage": zero, "precision": "bf16"},
            "optim": {"grad_clip": 1.0},
        }
    )


def engine_for(run, world: int):
    from pipeline.models import create_model
    from pipeline.train.engine import build_engine, model_init_context

    torch.manual_seed(0)
    with model_init_context(run, world):  # as the trainer builds it
        model = create_model(run.model)
    return build_engine(model, run, world, run.train.steps)[0]


def forward_backward(engine, cfg, batch: int) -> None:
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, dtype=torch.bfloat16)
    y = torch.randint(0, cfg.num_classes, (batch,))
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
    engine.backward(loss)


def step(engine, cfg, batch: int) -> None:
    forward_backward(engine, cfg, batch)
    engine.step()


def role_roof(_: argparse.Namespace) -> dict:
    from pipeline.train.trainer import measure_peak_flops

    cpu = torch.device("cpu")
    best = max(
        measure_peak_flops(torch.bfloat16, cpu, seconds=1.0, n=n) for n in (1024, 2048, 3072)
    )
    return {"roof_flops": best}


def role_step(args: argparse.Namespace) -> dict:
    from pipeline.plan import peak_allocated
    from pipeline.train.engine import init_distributed

    init_distributed()
    model = {"name": "vit-s16", "grad_checkpointing": args.checkpointing}
    run = run_config(model, zero=0, batch=args.batch)
    engine = engine_for(run, 1)
    step(engine, run.model, args.batch)  # warm-up: allocates optimizer states
    start = time.perf_counter()
    for _ in range(args.steps):
        step(engine, run.model, args.batch)
    seconds = (time.perf_counter() - start) / args.steps
    flops = run.model.train_flops() * args.batch / seconds
    # Activations as the plan counts them (tests/test_plan.py): the allocator's peak during a
    # forward and backward, not resident memory, which also grows by gradients and by what
    # the allocator keeps after frees.
    activation = peak_allocated(lambda: forward_backward(engine, run.model, args.batch))
    engine.step()
    return {"step_s": seconds, "model_flops": flops, "activation_gb": activation / 1e9}


def role_zero(args: argparse.Namespace) -> dict:
    from pipeline.plan import live_tensor_bytes
    from pipeline.train.engine import init_distributed

    comm = init_distributed()
    rank, world = comm.rank, comm.world
    before, tensors_before = rss_gb(), live_tensor_bytes()
    run = run_config({"name": args.model, "image_size": 32}, zero=args.zero, batch=2, world=world)
    engine = engine_for(run, world)
    step(engine, run.model, 2)
    state_gb = rss_gb() - before
    # The same state counted tensor by tensor, where it peaks: gradients reduced, optimizer
    # step not yet taken. Resident memory also holds what the allocator keeps after frees.
    optimizer_step, seen = engine.step, []

    def counted_step(*args, **kwargs):
        seen.append(live_tensor_bytes())
        return optimizer_step(*args, **kwargs)

    engine.step = counted_step
    step(engine, run.model, 2)
    comm.barrier("every rank's measured step")
    return {"rank": rank, "state_gb": state_gb, "tensor_gb": (seen[-1] - tensors_before) / 1e9}


def role_checkpoint(args: argparse.Namespace) -> dict:
    from pipeline.train.engine import init_distributed

    init_distributed()
    run = run_config({"name": "vit-b16", "image_size": 32}, zero=0, batch=2)
    engine = engine_for(run, 1)
    step(engine, run.model, 2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        engine.save_checkpoint(tmp, tag="bench", save_latest=False)
        ckpt_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp, "bench").iterdir())
        data = os.urandom(1 << 20) * (size >> 20)
        start = time.perf_counter()
        with open(Path(tmp, "plain.bin"), "wb") as f:
            f.write(data)
        plain_s = time.perf_counter() - start
    return {
        "bytes": size,
        "ckpt_bytes_per_s": size / ckpt_s,
        "plain_bytes_per_s": len(data) / plain_s,
    }


# (name, batch, tokens, width, heads, causal): the quickstart ViT's and ImageGPT's layers per rank,
# and ViT-S/16's at 224 px.
ATTENTION_SHAPES = [
    ("quickstart ViT", 64, 50, 128, 4, False),
    ("quickstart iGPT", 16, 196, 128, 4, True),
    ("ViT-S/16", 8, 197, 384, 6, False),
]


def role_attention(_: argparse.Namespace) -> dict:
    from pipeline.models.layers import Attention

    def seconds(attn: Attention, fused: bool, q, k, v) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            if fused:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=attn.causal
                )
            else:
                out = attn._probs(q, k, attn.causal) @ v
            out.sum().backward()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]  # median

    result = {}
    for name, batch, tokens, width, heads, causal in ATTENTION_SHAPES:
        attn = Attention(width, heads, causal=causal)
        qkv = [
            torch.randn(batch, heads, tokens, width // heads, dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        ]
        result[name] = (seconds(attn, True, *qkv), seconds(attn, False, *qkv))
    return result


def role_publish(args: argparse.Namespace) -> dict:
    """One `tessera pretrain` in this process, timed around Trainer.train() alone."""
    from pipeline.config import parse_config
    from pipeline.train.trainer import Trainer

    run = parse_config(json.loads(args.config))
    trainer = Trainer(run, resume="never", log=lambda _: None)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.close()
    last = run.train.steps
    stood = sum(t for step, t in trainer.blocked_at.items() if step < last)
    return {"train_s": seconds, "blocked_s": stood}


ROLES = {
    "publish": role_publish,
    "roof": role_roof,
    "attention": role_attention,
    "step": role_step,
    "zero": role_zero,
    "checkpoint": role_checkpoint,
}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = ROLES[args.role](args)
    # One file per process: ranks printing at once would interleave their lines.
    Path(args.out, f"{os.getpid()}.json").write_text(json.dumps(result))


def launch(role: str, *extra: str, ranks: int = 0, threads: int | None = None) -> list[dict]:
    """Run one measurement in its own process(es); returns each process's result."""
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as out:
        me = [
            str(Path(__file__).resolve()),
            "--role",
            role,
            "--threads",
            str(threads),
            "--out",
            out,
            *extra,
        ]
        if ranks:
            launcher = [
                str(Path(sys.executable).parent / "deepspeed"),
                "--num_gpus",
                str(ranks),
                "--no_local_rank",
            ]
            cmd = [*launcher, *me]
        else:
            cmd = [sys.executable, *me]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        results = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    if proc.returncode != 0 or len(results) != max(ranks, 1):
        sys.exit(f"benchmark role {role} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return results


def pulling(url: str, tmp: Path, repeats: int) -> dict:
    """Medians of downloading a run's newest checkpoint as a resume does (runs.pull_checkpoint,
    into an empty staging folder) and as s3fs's own concurrent recursive get, interleaved."""
    import statistics

    import fsspec

    from pipeline import runs

    name = runs.latest_checkpoint(url)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    remote = f"{url.removeprefix('s3://')}/checkpoints/{name}"
    mb = sum(fs.du(remote, total=False).values()) / 1e6
    pull, get = [], []
    for i in range(repeats):
        os.environ["TESSERA_STAGING"] = str(tmp / f"pull-{i}")
        start = time.perf_counter()
        runs.pull_checkpoint(url, name)
        pull.append(time.perf_counter() - start)
        start = time.perf_counter()
        fs.get(remote, str(tmp / f"get-{i}"), recursive=True)
        get.append(time.perf_counter() - start)
    return {"mb": mb, "pull_s": statistics.median(pull), "get_s": statistics.median(get)}


def publishing(args: argparse.Namespace) -> tuple[list, dict]:
    """Rows and figures of the `publish` measurement (see the module docstring)."""
    import socket
    import statistics

    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ways = ("behind", "disk", "before", "none")
    times: dict[str, list[float]] = {way: [] for way in ways}
    blocked: dict[str, list[float]] = {way: [] for way in ways}
    try:
        import fsspec

        deadline = time.monotonic() + 30
        while True:
            try:
                fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["TESSERA_STAGING"] = str(Path(tmp, "staging"))
            data = str(Path(tmp, "digits"))
            prepare(open_source("digits"), data,
                    PrepareOptions(samples_per_shard=500, executor="local", progress=False))  # fmt: skip
            for repeat in range(args.repeats):
                for way in ways:
                    every = args.publish_steps if way == "none" else args.publish_every
                    config = {
                        "model": {"name": "vit-small-p4", "image_size": 32, "channels": 1},
                        "data": {"url": data, "workers": 1, "augment": "none"},
                        "train": {"steps": args.publish_steps, "global_batch_size": 32,
                                  "output": f"s3://bench/{way}-{repeat}"},
                        "deepspeed": {"zero_stage": 1, "precision": "bf16"},
                        "checkpoint": {"every_steps": every, "keep_last": 2,
                                       "background": way != "before",
                                       "staging": "disk" if way == "disk" else "auto"},
                        "logging": {"every_steps": 1000, "tensorboard": False,
                                    "peak_tflops": 1.0},
                    }  # fmt: skip
                    result = launch("publish", "--config", json.dumps(config))[0]
                    times[way].append(result["train_s"])
                    blocked[way].append(result["blocked_s"])
                    print(f"  publish {way:<6} #{repeat + 1}: {result['train_s']:.1f} s, "
                          f"blocked {result['blocked_s']:.1f} s", flush=True)  # fmt: skip
            pull = pulling("s3://bench/before-0", Path(tmp), args.repeats)
    finally:
        moto.terminate()
        moto.wait(10)
    wall = {way: statistics.median(t) for way, t in times.items()}
    stall = {way: statistics.median(blocked[way]) for way in ways}  # before the last checkpoint
    extra = {way: wall[way] - wall["none"] for way in ways}
    ratio = stall["behind"] / stall["before"] if stall["before"] > 0 else float("nan")
    on_disk = stall["disk"] / stall["before"] if stall["before"] > 0 else float("nan")
    n = args.publish_steps // args.publish_every - 1  # checkpoints besides the last
    rows = [
        (f"{args.publish_steps} steps, none but the last", f"{wall['none']:.1f} s",
         f"median of {args.repeats}, interleaved"),
        (f"+{n} published before training on", f"{wall['before']:.1f} s",
         f"training stood {stall['before']:.1f} s; wall +{extra['before']:.1f} s"),
        (f"+{n} published behind training", f"{wall['behind']:.1f} s",
         f"training stood {stall['behind']:.1f} s: {ratio:.2f}x (target <= 0.10x); "
         f"wall +{extra['behind']:.1f} s"),
        (f"+{n} behind, staged on disk", f"{wall['disk']:.1f} s",
         f"training stood {stall['disk']:.1f} s: {on_disk:.2f}x; wall +{extra['disk']:.1f} s"),
        (f"resume: pull {pull['mb']:.0f} MB checkpoint", f"{pull['pull_s']:.2f} s",
         f"{pull['mb'] / pull['pull_s']:.0f} MB/s"),
        ("s3fs parallel get of the same", f"{pull['get_s']:.2f} s",
         f"pull {pull['get_s'] / pull['pull_s']:.2f}x its speed (target >= 0.8x)"),
    ]  # fmt: skip
    figures = {
        "resume_pull_vs_parallel_get_ratio": round(pull["get_s"] / pull["pull_s"], 3),
        "publish_behind_vs_before_blocked_ratio": round(ratio, 3),
        "publish_behind_on_disk_vs_before_blocked_ratio": round(on_disk, 3),
        "publish_behind_vs_before_wall_overhead_ratio": round(
            extra["behind"] / extra["before"] if extra["before"] > 0 else float("nan"), 3
        ),
        "publish_seconds": {way: [round(t, 2) for t in ts] for way, ts in times.items()},
        "publish_blocked_seconds": {way: [round(t, 2) for t in b] for way, b in blocked.items()},
    }
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--batch", type=int, default=8, help="images per step (ViT-S/16, 224 px)")
    parser.add_argument("--role", choices=list(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="vit-b16", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dir", default=None, help="where the checkpoint I/O test writes (default: temp)"
    )
    parser.add_argument("--only", choices=["publish"], help="run one measurement alone")
    parser.add_argument("--publish-steps", type=int, default=24)
    parser.add_argument("--publish-every", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="of the publish measurement")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return child(args)
    if args.only == "publish":
        rows, figures = publishing(args)
        print(f"{'checkpoints published to s3:// (moto)':<36} {'value':>14}  note")
        for name, value, note in rows:
            print(f"{name:<36} {value:>14}  {note}")
        print(json.dumps(figures))
        return

    common = ["--steps", str(args.steps), "--batch", str(args.batch)]
    roof = launch("roof")[0]["roof_flops"]
    plain = launch("step", *common)[0]
    ckpt = launch("step", *common, "--checkpointing")[0]
    cores = os.cpu_count() or 2
    per_rank = max(1, cores // 2)

    def zero_state(stage: str) -> tuple[float, float]:
        """ViT-B's per-rank (live tensors, resident memory) above a 60K-parameter model's at the
        same stage: DeepSpeed's fixed costs (buffers, loaded ops) cancel, the model's state stays."""
        big = launch("zero", "--zero", stage, ranks=2, threads=per_rank)
        tiny = launch("zero", "--zero", stage, "--model", "vit-micro-p4", ranks=2, threads=per_rank)
        return tuple(
            max(r[key] for r in big) - max(r[key] for r in tiny)
            for key in ("tensor_gb", "state_gb")
        )

    attention = launch("attention", threads=1)[0]
    io = launch("checkpoint", *(["--dir", args.dir] if args.dir else []))[0]
    publish_rows, publish_figures = publishing(args)

    mfu = plain["model_flops"] / roof
    (z0, z0_rss), (z3, z3_rss) = zero_state("0"), zero_state("3")
    rows = [
        ("bf16 matmul roof", f"{roof / 1e9:.1f} GFLOP/s", ""),
        (
            f"ViT-S/16 train step, batch {args.batch}",
            f"{plain['step_s']:.2f} s",
            f"{plain['model_flops'] / 1e9:.1f} GFLOP/s",
        ),
        ("MFU (model FLOPs / roof)", f"{100 * mfu:.1f}%", "target >= 35%"),
        (
            "activations, checkpointing off",
            f"{plain['activation_gb']:.2f} GB",
            f"step {plain['step_s']:.2f} s",
        ),
        (
            "activations, checkpointing on",
            f"{ckpt['activation_gb']:.2f} GB",
            f"step {ckpt['step_s']:.2f} s",
        ),
        ("ViT-B state per rank, ZeRO-0 x2", f"{z0:.2f} GB", f"resident {z0_rss:.2f} GB"),
        (
            "ViT-B state per rank, ZeRO-3 x2",
            f"{z3:.2f} GB",
            f"{z3 / z0:.2f}x (target <= 0.55x); resident {z3_rss:.2f} GB, {z3_rss / z0_rss:.2f}x",
        ),
        *(
            (
                f"attention fwd+bwd, {name}",
                f"{explicit * 1e3:.1f} ms",
                f"fused SDPA {fused * 1e3:.1f} ms: {fused / explicit:.2f}x slower",
            )
            for name, (fused, explicit) in attention.items()
        ),
        (
            "checkpoint write",
            f"{io['ckpt_bytes_per_s'] / 1e6:.0f} MB/s",
            f"{io['bytes'] / 1e6:.0f} MB",
        ),
        (
            "plain sequential write",
            f"{io['plain_bytes_per_s'] / 1e6:.0f} MB/s",
            f"{io['ckpt_bytes_per_s'] / io['plain_bytes_per_s']:.2f}x (target >= 0.5x)",
        ),
        *publish_rows,
    ]
    print(f"{'train step (' + str(cores) + ' CPU cores)':<36} {'value':>14}  note")
    for name, value, note in rows:
        print(f"{name:<36} {value:>14}  {note}")
    print(
        json.dumps(
            {
                "mfu": round(mfu, 4),
                "roof_gflops": round(roof / 1e9, 1),
                "model_gflops": round(plain["model_flops"] / 1e9, 1),
                "activation_gb_checkpointing_off": round(plain["activation_gb"], 3),
                "activation_gb_checkpointing_on": round(ckpt["activation_gb"], 3),
                "activation_checkpointing_memory_ratio": round(
                    ckpt["activation_gb"] / max(plain["activation_gb"], 1e-9), 3
                ),
                "attention_sdpa_vs_explicit_bf16_cpu_ratio": {
                    name: round(fused / explicit, 2)
                    for name, (fused, explicit) in attention.items()
                },
                "zero3_vs_zero0_state_ratio": round(z3 / z0, 3),
                "zero3_vs_zero0_resident_ratio": round(z3_rss / z0_rss, 3),
                "checkpoint_vs_sequential_write_ratio": round(
                    io["ckpt_bytes_per_s"] / io["plain_bytes_per_s"], 3
                ),
                **publish_figures,
            }
        )
    )


if __name__ == "__main__":
    main()
