"""Training: DeepSpeed on CPU ranks, complete-or-ignored checkpoints, exact resume, preemption."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, TESSERA

from pipeline.config import parse_config
from pipeline.errors import EXIT_PREEMPTED, ConfigError
from pipeline.train import checkpoint
from pipeline.train.engine import batch_layout, deepspeed_config
from pipeline.train.optim import lr_schedule, param_groups

STEP_LINE = re.compile(r"^step (\d+)/\d+ loss ([0-9.]+)", re.M)
TIMEOUT = 600  # the first DeepSpeed launch on a machine compiles its CPU ops (about a minute)


def write_config(tmp_path, digits_url, name="run.yaml", **sections):
    cfg = {
        "model": {"name": "vit-micro-p4", "image_size": 16, "channels": 1, "num_classes": 10},
        "data": {"url": digits_url, "workers": 0, "shuffle_buffer": 256, "augment": "none"},
        "train": {
            "objective": "supervised",
            "steps": 12,
            "global_batch_size": 16,
            "output": str(tmp_path / "run"),
        },
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2, "precision": "auto"},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"every_steps": 1, "peak_tflops": 0.1},
    }
    for section, values in sections.items():
        replace = section == "model" and "name" in values  # another model: not a ViT plus changes
        cfg[section] = dict(values) if replace else {**cfg.get(section, {}), **values}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cmd, env=None, **kw) -> subprocess.Popen:
    """A command and every process it starts in one process group, output merged."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    return subprocess.Popen(
        list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, start_new_session=True, **kw,
    )  # fmt: skip


def pretrain(config, *args, ranks=1, command="pretrain", **kw):
    """`tessera COMMAND CONFIG` in one process, or on `ranks` CPU ranks under deepspeed."""
    if ranks == 1:
        return launch([TESSERA, command, config, *args], **kw)
    launcher = [BIN / "deepspeed", "--num_gpus", ranks, "--no_local_rank", "--master_port", _port()]
    return launch([*launcher, "--module", "pipeline.cli", command, config, *args], **kw)


def _port():
    from conftest import free_port

    return free_port()


def wait(proc) -> str:
    """Its output once it exits. One that outlives TIMEOUT is killed with all its ranks: a
    hung rank fails its test instead of holding the pipe, and the suite, open forever."""
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    raise AssertionError(f"still running after {TIMEOUT}s:\n{out[-3000:]}")


def finish(proc):
    out = wait(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(out):
    return {int(s): float(v) for s, v in STEP_LINE.findall(out)}


def run_export(source: Path, dest: Path) -> str:
    cmd = [TESSERA, "export", str(source), str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def kill_when(proc, path: Path, sig=signal.SIGKILL):
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} never appeared:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    if sig == "tree":  # SIGTERM to every process the command started
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    return wait(proc)


def resume_matches_uninterrupted(tmp_path, digits_url, kill_at: int, ranks: int = 1, **sections):
    """The same config run twice: uninterrupted in tmp_path/a, and in tmp_path/b killed (the
    whole launch) once step `kill_at`'s checkpoint is complete, then resumed. Asserts that the
    resumed steps' losses are the uninterrupted run's and that both exports hold the same
    bytes (running statistics included). Returns (uninterrupted output, resumed output)."""
    import torch

    from pipeline.models import load_model

    runs = {r: tmp_path / r for r in "ab"}
    for folder in runs.values():
        folder.mkdir()
    clean_out = finish(pretrain(write_config(runs["a"], digits_url, **sections), ranks=ranks))
    config = write_config(runs["b"], digits_url, **sections)
    proc = pretrain(config, ranks=ranks)
    kill_when(proc, runs["b"] / "run" / "checkpoints" / f"step-{kill_at:07d}" / "COMPLETE")
    out = finish(pretrain(config, ranks=ranks))
    assert f"step-{kill_at:07d}" in out and "resumed from" in out, out[-2000:]
    clean, resumed = losses(clean_out), losses(out)
    assert min(resumed) == kill_at + 1 and max(resumed) == max(clean)
    assert all(resumed[s] == clean[s] for s in resumed), (resumed, clean)
    for folder in runs.values():
        run_export(folder / "run", folder / "export")
    a, b = (load_model(str(folder / "export")).state_dict() for folder in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return clean_out, out


# -- units --------------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_position_embeddings_and_tokens():
    from pipeline.models import create_model

    for name in ("vit-micro-p4", "igpt-micro"):
        model = create_model(name)
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        skipped = {names[id(p)] for p in no_decay["params"]}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(
            n.endswith(".bias") or "norm" in n or "embed" in n or "token" in n for n in skipped
        )
        assert {"pos_embed"} <= skipped and all(
            names[id(p)].endswith("weight") for p in decay["params"]
        )


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = parse_config(
        {"model": {"name": "vit-micro-p4"}, "optim": {"warmup_steps": 10, "min_lr_ratio": 0.1}}
    ).optim
    f = lr_schedule(cfg, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    linear = lr_schedule(
        parse_config({"model": {"name": "vit-micro-p4"}, "optim": {"schedule": "linear"}}).optim,
        100,
    )
    assert linear(50) == pytest.approx(0.5)


def test_deepspeed_config_follows_the_run_config_and_checks_a_users_file(tmp_path):
    run = parse_config(
        {"model": {"name": "vit-micro-p4"}, "train": {"global_batch_size": 64},
         "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "micro_batch_size": 8, "precision": "fp16"}}
    )  # fmt: skip
    ds = deepspeed_config(run, world=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4)
    assert (
        ds["zero_optimization"]["stage"] == 3
        and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="not a multiple of micro batch 8 x 3 ranks"):
        batch_layout(run, 3)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    bad = parse_config(
        {
            "model": {"name": "vit-micro-p4"},
            "deepspeed": {"zero_stage": 3, "config_file": str(user)},
        }
    )
    with pytest.raises(
        ConfigError, match=r"ds\.json: zero_optimization\.stage is 2 but deepspeed\.zero_stage is 3"
    ):
        deepspeed_config(bad, 1)


@pytest.mark.parametrize(
    "deepspeed",
    [
        {"zero_stage": 1, "precision": "fp16"},
        {"zero_stage": 2, "precision": "fp16", "offload_optimizer": True},
        {"zero_stage": 3, "precision": "bf16", "offload_params": True, "offload_optimizer": True},
    ],
)
def test_deepspeeds_own_parser_reads_every_stage_precision_and_offload_we_generate(deepspeed):
    """fp16 cannot train on DeepSpeed's CPU accelerator; its config is checked here instead."""
    from deepspeed.runtime.config import DeepSpeedConfig

    run = parse_config(
        {"model": {"name": "vit-micro-p4"}, "train": {"global_batch_size": 32},
         "deepspeed": {**deepspeed, "micro_batch_size": 8}}
    )  # fmt: skip
    parsed = DeepSpeedConfig(deepspeed_config(run, world=1))
    assert parsed.zero_optimization_stage == deepspeed["zero_stage"]
    assert parsed.gradient_accumulation_steps == 4
    fp16 = parsed.float16_config
    assert fp16.enabled == (deepspeed["precision"] == "fp16")
    if fp16.enabled:  # dynamic loss scaling from 2**16, as the config says
        assert (fp16.loss_scale, fp16.initial_scale_power) == (0, 16)
    assert parsed.bfloat16_config.enabled == (deepspeed["precision"] == "bf16")
    zero = parsed.zero_config
    assert (zero.offload_optimizer is not None) == deepspeed.get("offload_optimizer", False)
    assert (zero.offload_param is not None) == deepspeed.get("offload_params", False)


def test_half_written_checkpoints_are_never_chosen(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        (root / checkpoint.tag(step)).mkdir(parents=True)
    for step in (4, 8):
        (root / checkpoint.tag(step) / checkpoint.COMPLETE).write_text("{}")
    (root / checkpoint.LATEST).write_text(checkpoint.tag(12))  # a pointer to a half-written one
    assert checkpoint.find_latest(root).name == "step-0000008"
    (root / checkpoint.LATEST).unlink()
    assert checkpoint.find_latest(root).name == "step-0000008"
    assert checkpoint.find_latest(tmp_path / "none") is None


# -- end to end (subprocesses, as users run them) ---------------------------------------------


def test_ops_build_with_the_environments_ninja_first(tmp_path, monkeypatch):
    """Two ninja versions on one machine rebuild the ops at every switch, so every process that
    loads them puts the environment's own first on PATH."""
    import sys

    from pipeline.train.engine import use_environment_ninja

    bindir = tmp_path / "env" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", f"/usr/bin:{bindir}:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # restored after the test
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    use_environment_ninja()
    assert os.environ["PATH"] == f"/usr/bin:{bindir}:/bin"  # no ninja there: left alone
    (bindir / "ninja").touch()
    use_environment_ninja()
    assert os.environ["PATH"] == f"{bindir}:/usr/bin:/bin"
    # ... and builds into a folder of its own: another environment's builds are not its own
    mine = os.environ["TORCH_EXTENSIONS_DIR"]
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-env"))
    use_environment_ninja()
    assert Path(mine).parent == Path(os.environ["TORCH_EXTENSIONS_DIR"]).parent
    assert Path(mine).name.startswith("env-") and os.environ["TORCH_EXTENSIONS_DIR"] != mine


@pytest.mark.slow
def test_only_build_locks_that_no_process_holds_are_removed(tmp_path):
    from pipeline.train.engine import clear_stale_build_locks

    stale, held = tmp_path / "py311_cpu" / "fused_adam" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, held):
        lock.parent.mkdir(parents=True)
        lock.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; os.open({str(held)!r}, os.O_RDONLY); "
         "print('holding', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "holding\n"
        said = []
        assert clear_stale_build_locks(tmp_path, log=said.append) == [stale]
    finally:
        holder.kill()
    assert not stale.exists() and held.exists()
    assert "left by a killed process" in said[0] and str(stale) in said[0]


@pytest.mark.slow
def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(tmp_path, digits_url):
    # What preemption during DeepSpeed's op build leaves behind: torch waits on it forever.
    from torch.utils.cpp_extension import _get_build_directory

    from pipeline.train.engine import use_environment_ninja

    use_environment_ninja()  # the build folder the run will use: this environment's
    lock = Path(_get_build_directory("fused_adam", verbose=False)) / "lock"
    config = write_config(tmp_path, digits_url, train={"steps": 3}, optim={"warmup_steps": 1})
    # A run of another test (the other pytest worker) may clear the lock first, as any run on
    # the machine would: then this run proved nothing, and the lock is left again (3 tries).
    for attempt in range(3):
        lock.touch()
        try:
            out = finish(pretrain(config, "--set", f"train.output={tmp_path}/run{attempt}"))
        finally:
            lock.unlink(missing_ok=True)
        assert sorted(losses(out)) == [1, 2, 3], out[-3000:]  # through the lock, not stuck
        if f"removed {lock}" in out:
            break
    assert f"removed {lock}" in out, out[-3000:]


@pytest.mark.slow
def test_single_process_pretraining_learns_checkpoints_and_logs(tmp_path, digits_url):
    # Average pooling and a constant lr: a tiny ViT learns visibly within 60 steps that way.
    config = write_config(
        tmp_path,
        digits_url,
        model={"pool": "avg"},
        optim={"schedule": "constant"},
        train={"steps": 60, "validate_every_steps": 20, "validate_samples": 100},
        checkpoint={"every_steps": 10},
    )
    out = finish(pretrain(config))
    got = losses(out)
    # Validation: 7 batches of 16 (at least 100 images) of the val split at steps 20, 40, 60.
    val = {
        int(m[1]): (float(m[2]), float(m[3]))
        for m in re.finditer(
            r"^validation at step (\d+): accuracy ([0-9.]+) loss ([0-9.]+) \(112 images of val\)",
            out, re.M,
        )
    }  # fmt: skip
    assert sorted(val) == [20, 40, 60], out[-3000:]
    assert val[60][1] < val[20][1] and val[60][0] > val[20][0], val
    assert sorted(got) == list(range(1, 61))
    first, last = sum(got[s] for s in range(1, 6)) / 5, sum(got[s] for s in range(51, 61)) / 10
    assert last < first - 0.05, out[-2000:]
    assert re.search(r"img/s MFU [0-9.]+% ETA \d+s", out)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000050", "step-0000060"]
    assert (ckpts / "latest").read_text() == "step-0000060"
    state = json.loads((ckpts / "step-0000060" / "trainer.json").read_text())
    assert state["step"] == 60 and state["stream"]["format"] == "tessera-stream/1"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "train/mfu",
        "train/grad_norm",
        "data/errors",
    } <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 61))
    assert "images/attention_rollout" in events.Tags()["images"]
    validation = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "validation"))
    validation.Reload()
    assert {"val/loss", "val/accuracy"} == set(validation.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in validation.Scalars("val/loss")] == [
        (step, val[step][1]) for step in (20, 40, 60)
    ]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, digits_url):
    clean = losses(
        finish(
            pretrain(
                write_config(tmp_path / "a", digits_url)
                if (tmp_path / "a").mkdir() is None
                else None
            )
        )
    )
    config = write_config(tmp_path / "b", digits_url) if (tmp_path / "b").mkdir() is None else None
    proc = pretrain(config)
    kill_when(proc, tmp_path / "b" / "run" / "checkpoints" / "step-0000008" / "COMPLETE")
    out = finish(pretrain(config))
    assert "resumed from" in out and "at step 8" in out
    resumed = losses(out)
    assert sorted(resumed) == list(range(9, 13))
    assert all(resumed[s] == clean[s] for s in resumed), (resumed, clean)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "b" / "run" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # one curve, no step twice


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "checkpointing"), [(2, False), (3, True)])
def test_two_ranks_under_the_deepspeed_launcher_resume_exactly(
    tmp_path, digits_url, zero, checkpointing
):
    model = {"grad_checkpointing": checkpointing}
    sections = dict(
        deepspeed={"zero_stage": zero}, model=model,
        train={"validate_every_steps": 4, "validate_samples": 64},
    )  # fmt: skip
    clean_dir, run_dir = tmp_path / "clean", tmp_path / "killed"
    clean_dir.mkdir()
    run_dir.mkdir()
    clean_out = finish(pretrain(write_config(clean_dir, digits_url, **sections), ranks=2))
    clean = losses(clean_out)
    config = write_config(run_dir, digits_url, **sections)
    proc = pretrain(config, ranks=2)
    kill_when(proc, run_dir / "run" / "checkpoints" / "step-0000004" / "COMPLETE")
    out = finish(pretrain(config, ranks=2))
    resumed = losses(out)
    assert min(resumed) >= 5 and max(resumed) == 12
    assert all(resumed[s] == clean[s] for s in resumed), (resumed, clean)
    # Validation on both ranks' shares (64 images: 2 batches of 16 on each), the same after
    # the resume as without it.
    line = re.compile(r"^validation at step (\d+): (.*\(64 images of val\))$", re.M)
    clean_val = dict(line.findall(clean_out))
    assert sorted(clean_val, key=int) == ["4", "8", "12"], clean_out[-3000:]
    assert {k: v for k, v in line.findall(out) if int(k) > 4} == {
        k: v for k, v in clean_val.items() if int(k) > 4
    }
    shards = list((run_dir / "run" / "checkpoints" / "step-0000012").glob("*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO shard per rank
    # One process, no DeepSpeed ranks, gathers the shards into one model.
    from pipeline.models import load_model

    run_export(run_dir / "run", run_dir / "export")
    model = load_model(str(run_dir / "export")).eval()
    import torch

    assert torch.isfinite(model(torch.rand(2, 1, 16, 16))).all()


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "workers"), [(1, 0), (2, 2)])
def test_sigterm_to_every_process_saves_a_checkpoint_and_exits_preempted(
    tmp_path, digits_url, ranks, workers
):
    """As SLURM and the deepspeed launcher send it: to every process of the tree, the loader
    workers included."""
    config = write_config(
        tmp_path, digits_url, train={"steps": 100000}, checkpoint={"every_steps": 5},
        data={"workers": workers},
    )  # fmt: skip
    proc = pretrain(config, ranks=ranks)
    out = kill_when(
        proc, tmp_path / "run" / "checkpoints" / "step-0000005" / "COMPLETE", sig="tree"
    )
    assert "SIGTERM: saved" in out and "killed by signal" not in out, out[-3000:]
    assert out.count("stopped by SIGTERM at step") == ranks  # each rank's exit message
    if ranks == 1:  # under the deepspeed launcher, the launcher's own status is its own
        assert proc.returncode == EXIT_PREEMPTED
    latest = checkpoint.find_latest(tmp_path / "run" / "checkpoints")
    assert latest.name == checkpoint.tag(max(losses(out)))


@pytest.mark.slow
def test_config_errors_stop_pretrain_before_any_work(tmp_path, digits_url):
    config = write_config(
        tmp_path, digits_url, train={"global_batch_size": 10}, deepspeed={"micro_batch_size": 4}
    )
    proc = subprocess.run(
        [TESSERA, "pretrain", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert (
        proc.returncode == 2
        and "deepspeed.micro_batch_size: got 4; must divide train.global_batch_size=10"
        in proc.stderr
    )
    assert not (tmp_path / "run").exists()
    config = write_config(
        tmp_path, digits_url, train={"validate_every_steps": 5}, data={"val_split": "nope"}
    )
    proc = subprocess.run(
        [TESSERA, "pretrain", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 2 and "train.validate_every_steps reads data.val_split" in proc.stderr
    assert "no split 'nope'" in proc.stderr, proc.stderr[-2000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.slow
def test_export_loads_without_deepspeed_and_reproduces_the_trained_weights(tmp_path, digits_url):
    config = write_config(tmp_path, digits_url, deepspeed={"precision": "fp32"}, train={"steps": 6})
    finish(pretrain(config))
    printed = run_export(tmp_path / "run", tmp_path / "export")
    assert "exported" in printed and "step-0000006" in printed
    # A fresh interpreter that never imports deepspeed loads it and gets the trained weights.
    check = f"""
import sys, torch
from pipeline.models import load_model
model = load_model({str(tmp_path / "export")!r}).eval()
trained = torch.load({str(tmp_path / "run/checkpoints/step-0000006/mp_rank_00_model_states.pt")!r}, weights_only=False)["module"]
assert "deepspeed" not in sys.modules
for k, v in model.state_dict().items():
    torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
x = torch.rand(2, 1, 16, 16)
reference = type(model)(model.cfg).eval()
reference.load_state_dict(trained)
torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def _nan_run(tmp_path, digits_url, calls, where="loss", zero=2, precision="bf16", steps=8, micro=0):
    tmp_path.mkdir(exist_ok=True)
    config = write_config(
        tmp_path, digits_url, train={"steps": steps}, checkpoint={"every_steps": 100},
        deepspeed={"zero_stage": zero, "precision": precision, "micro_batch_size": micro},
    )  # fmt: skip
    launcher = [BIN / "deepspeed", "--num_gpus", 2, "--no_local_rank", "--master_port", _port()]
    script = Path(__file__).with_name("nan_on_one_rank.py")
    proc = launch([*launcher, script, config, ",".join(map(str, calls)), where])
    return proc, wait(proc)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "zero", "precision"),
    [("loss", 2, "bf16"), ("grad", 2, "bf16"), ("grad", 3, "bf16"), ("grad", 0, "fp32")],
)
def test_a_nan_on_one_rank_is_skipped_by_all_ranks_together(
    tmp_path, digits_url, where, zero, precision
):
    # "grad": the loss is finite and only the gradients are not, found after backward.
    proc, out = _nan_run(
        tmp_path, digits_url, calls=[3, 4], where=where, zero=zero, precision=precision
    )
    assert proc.returncode == 0, out[-3000:]
    logged = losses(out)
    assert sorted(logged) == list(range(1, 9))  # no hang, every step still trained
    assert all(math.isfinite(v) for v in logged.values())  # no poisoned weights
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-0000008" / "trainer.json").read_text()
    )
    assert state["skipped"] == 2


LR = re.compile(r"^step (\d+)/\d+ loss .*? lr ([0-9.e+-]+) ", re.M)


@pytest.mark.slow
def test_a_nan_mid_accumulation_still_draws_the_step_and_applies_none_of_it(tmp_path, digits_url):
    # 16 images a step on 2 ranks in micro-batches of 2: 4 micro-batches per step and rank.
    # Objective call 7 on rank 1 is the third micro-batch of step 2.
    proc, out = _nan_run(tmp_path / "nan", digits_url, calls=[7], micro=2)
    assert proc.returncode == 0, out[-3000:]
    logged = losses(out)
    assert sorted(logged) == list(range(1, 9)) and all(map(math.isfinite, logged.values()))
    # The skipped step moved neither the schedule nor the step counter: step s still logs the
    # schedule's lr for s (warmup 2, cosine over 8; a skipped step counted would shift it).
    run = parse_config(yaml.safe_load((tmp_path / "nan" / "run.yaml").read_text()))
    factor = lr_schedule(run.optim, run.train.steps)
    assert {int(k): v for k, v in LR.findall(out)} == {
        step: f"{run.optim.lr * factor(step):.2e}" for step in range(1, 9)
    }
    assert factor(5) != factor(6)  # the schedule does tell the steps apart
    ckpt = tmp_path / "nan" / "run" / "checkpoints"
    state = json.loads((ckpt / "step-0000008" / "trainer.json").read_text())
    assert state["step"] == 8 and state["skipped"] == 1
    # ... while all of its micro-batches were drawn: 9 steps of 4 on each reader.
    assert state["stream"]["consumed"] == {"0": 36, "1": 36}
    assert state["stream"]["seen"] == 9 * 16


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_the_run_naming_the_steps(tmp_path, digits_url):
    proc, out = _nan_run(tmp_path, digits_url, calls=range(3, 20))
    assert proc.returncode != 0
    assert "not finite on some rank for 5 steps in a row, within steps [3, 7]" in out


@pytest.mark.slow
def test_resume_at_world_size_1_from_a_checkpoint_written_at_2(tmp_path, digits_url):
    # fp32, so the weights can be compared exactly (a few tiny steps move weights by about what
    # bf16 rounds away).
    config = write_config(
        tmp_path, digits_url, train={"steps": 10}, deepspeed={"precision": "fp32"}
    )
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    proc = pretrain(config, ranks=2)
    kill_when(proc, tmp_path / "run" / "checkpoints" / "step-0000004" / "COMPLETE")
    ckpt = checkpoint.find_latest(tmp_path / "run" / "checkpoints")
    written = json.loads((ckpt / "trainer.json").read_text())
    assert written["world"] == 2
    # One process loads it: the weights are exactly the checkpoint's, gathered from 2 shards.
    check = f"""
import torch
from pipeline.config import load_config
from pipeline.train.engine import consolidated_state_dict
from pipeline.train.trainer import Trainer
trainer = Trainer(load_config({str(config)!r}), resume="auto")
reference = consolidated_state_dict({str(ckpt)!r})
weights = trainer.engine.module.state_dict()
assert trainer.step == {written["step"]}, trainer.step
for key, value in reference.items():
    torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
trainer.close()
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.stdout.strip().endswith("ok"), (out.stdout + out.stderr)[-3000:]
    assert "was written by 2 ranks at ZeRO-2; converting it for 1 ranks at ZeRO-2" in out.stdout
    # ... and trains on: the rest of the epoch's samples are dealt out to the one rank.
    resumed = losses(finish(pretrain(config)))
    assert min(resumed) == written["step"] + 1 and max(resumed) == 10
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-0000010" / "trainer.json").read_text()
    )
    assert state["world"] == 1 and state["stream"]["phase"]["generation"] == 1
    # DeepSpeed's shared-memory all-reduce buffers went with the ranks, killed or not.
    assert set(Path("/dev/shm").glob("deepspeed_*")) <= shm_before


@pytest.mark.slow
def test_torchrun_launches_the_same_command(tmp_path, digits_url):
    config = write_config(tmp_path, digits_url, train={"steps": 4})
    torchrun = [BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _port()]
    finish(launch([*torchrun, "-m", "pipeline.cli", "pretrain", config]))
    shards = list((tmp_path / "run" / "checkpoints" / "step-0000004").glob("*optim_states.pt"))
    assert len(shards) == 2


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["igpt-ar", "igpt-bert"])
def test_imagegpt_pretrains_on_palette_tokens(tmp_path, digits_url, objective):
    config = write_config(
        tmp_path,
        digits_url,
        model={
            "name": "igpt-micro",
            "image_size": 8,
            "vocab_size": 16,
            "causal": objective == "igpt-ar",
        },
        data={"palette": "grey", "palette_size": 16},
        train={"objective": objective, "steps": 30},
        optim={"lr": 3e-3, "schedule": "constant"},
        checkpoint={"every_steps": 30},
    )
    out = finish(pretrain(config))
    got = losses(out)
    assert sorted(got) == list(range(1, 31))
    assert "bits_per_dim" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "images/completions" in events.Tags()["images"]
    assert "train/tokens_per_s" in events.Tags()["scalars"]
    # From about log2(16) = 4 bits a pixel towards the data's entropy.
    first, last = sum(got[s] for s in range(1, 4)) / 3, sum(got[s] for s in range(21, 31)) / 10
    assert last < first - 0.3, out[-2000:]


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, digits_url):
    config = write_config(
        tmp_path, digits_url, train={"steps": 8}, checkpoint={"every_steps": 4, "keep_last": 3}
    )
    clean = losses(finish(pretrain(config)))
    root = tmp_path / "run" / "checkpoints"
    # As if killed while step 8 was being written: its marker never came, `latest` not moved.
    (root / "step-0000008" / checkpoint.COMPLETE).unlink()
    (root / checkpoint.LATEST).write_text("step-0000004")
    out = finish(pretrain(config))
    assert "resumed from" in out and "step-0000004 at step 4" in out
    resumed = losses(out)
    assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[s] == clean[s] for s in resumed)
    assert checkpoint.is_complete(root / "step-0000008")  # rewritten, complete this time


def ranks_with_a_kill(config, point, rank, nth, *args):
    """tests/kill_one_rank.py on 2 ranks: (the process, its output)."""
    launcher = [BIN / "deepspeed", "--num_gpus", 2, "--no_local_rank", "--master_port", _port()]
    script = Path(__file__).with_name("kill_one_rank.py")
    proc = launch([*launcher, script, config, point, rank, nth, *args])
    return proc, wait(proc)


@pytest.mark.slow
def test_three_untidy_kills_of_one_rank_resume_to_the_uninterrupted_weights_byte_for_byte(
    tmp_path, digits_url
):
    """Loader workers and augmentation on; one rank killed mid-step, after the shards but
    before COMPLETE, and between COMPLETE and `latest`, in one run."""
    import random

    from safetensors.torch import load_file

    sections = {
        "data": {"workers": 2, "augment": "vit"},
        "train": {"steps": 15},
        "checkpoint": {"every_steps": 3, "keep_last": 10},
    }
    (tmp_path / "clean").mkdir()
    (tmp_path / "killed").mkdir()
    finish(pretrain(write_config(tmp_path / "clean", digits_url, **sections), ranks=2))
    config = write_config(tmp_path / "killed", digits_url, **sections)
    rng = random.Random(20261203)
    kills = [("step", 1, rng.randint(4, 8)), ("shards", rng.randint(0, 1), 1), ("marker", 0, 2)]
    ckpts = tmp_path / "killed" / "run" / "checkpoints"
    for point, rank, nth in kills:
        proc, out = ranks_with_a_kill(config, point, rank, nth)
        print(f"kill {point} rank {rank} #{nth}:", *re.findall(r"KILL .*", out))  # the log
        assert proc.returncode != 0 and f"KILL {point} rank {rank}" in out, out[-3000:]
        if point == "step":  # what had completed behind training before the kill
            complete = checkpoint.complete_checkpoints(ckpts)
            last = checkpoint.step_of(complete[-1].name) if complete else 0
            assert last <= 3 * ((nth - 1) // 3)
        if point == "shards":  # the shards of last + 3 are there, its marker is not
            half = ckpts / f"{checkpoint.tag(last + 3)}{checkpoint.PARTIAL}"
            assert list(half.glob("*optim_states.pt")) and not checkpoint.is_complete(half)
            assert not (ckpts / checkpoint.tag(last + 3)).exists()
    assert checkpoint.is_complete(ckpts / checkpoint.tag(last + 6))  # the "marker" kill ...
    assert (ckpts / checkpoint.LATEST).read_text() == checkpoint.tag(last + 3)  # ... left it
    out = finish(pretrain(config, ranks=2))
    assert f"at step {last + 6}" in out  # the newest complete checkpoint, not `latest`'s
    for name in ("clean", "killed"):
        run_export(tmp_path / name / "run", tmp_path / name / "export")
    clean = load_file(tmp_path / "clean" / "export" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "export" / "model.safetensors")
    assert clean.keys() == resumed.keys()
    differ = [k for k in clean if clean[k].numpy().tobytes() != resumed[k].numpy().tobytes()]
    assert differ == [], differ
    final = checkpoint.tag(15)
    want, got = (
        json.loads((tmp_path / n / "run" / "checkpoints" / final / "trainer.json").read_text())
        for n in ("clean", "killed")
    )
    for key in ("phase", "consumed", "seen", "errors", "quarantine"):
        assert got["stream"][key] == want["stream"][key], key


@pytest.mark.slow
@pytest.mark.parametrize(
    "deepspeed",
    [
        # bf16, as GPU runs train (the base config's "auto" is fp32 on an AVX2-only CPU)
        {"zero_stage": 1, "precision": "bf16"},
        {"zero_stage": 2, "offload_optimizer": True, "precision": "bf16"},
        {"zero_stage": 3, "offload_params": True, "offload_optimizer": True, "precision": "bf16"},
    ],
    ids=["zero1", "zero2-offload-optimizer", "zero3-offload-params"],
)
def test_every_zero_stage_and_offload_trains_at_two_ranks(tmp_path, digits_url, deepspeed):
    config = write_config(
        tmp_path, digits_url, deepspeed=deepspeed, train={"steps": 6},
        checkpoint={"every_steps": 6}, optim={"schedule": "constant", "lr": 3e-3},
    )  # fmt: skip
    # Without OMP_NUM_THREADS, as a plain launcher leaves it: the ranks split the cores.
    out = finish(pretrain(config, ranks=2, env={"OMP_NUM_THREADS": ""}))
    cores = len(os.sched_getaffinity(0))
    assert f"cpu: 2 ranks share this machine's {cores} cores: {max(1, cores // 2)} threads" in out
    logged = losses(out)
    assert sorted(logged) == list(range(1, 7)) and all(map(math.isfinite, logged.values()))
    state = json.loads((tmp_path / "run/checkpoints/step-0000006/trainer.json").read_text())
    assert state["skipped"] == 0  # every update applied
    assert len(list((tmp_path / "run/checkpoints/step-0000006").glob("*optim_states.pt"))) == 2
    export = run_export(tmp_path / "run", tmp_path / "export")
    assert "exported" in export


@pytest.mark.slow
def test_fp16_on_cpu_ranks_stops_with_a_config_error_naming_the_choices(tmp_path, digits_url):
    config = write_config(tmp_path, digits_url, deepspeed={"precision": "fp16"})
    proc = subprocess.run(
        [TESSERA, "pretrain", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "deepspeed.precision: fp16 is not supported by DeepSpeed on this device (cpu)" in (
        proc.stderr
    )
    assert "choose one of ['bf16', 'fp32']" in proc.stderr


@pytest.mark.slow  # loads (and where not built, compiles) DeepSpeed's CPU Adam op
def test_cpu_adam_after_a_resume_updates_exactly_as_the_uninterrupted_optimizer():
    """DeepSpeedCPUAdam (ZeRO-Offload's optimizer) keeps beta**t in the process, multiplied
    once a step; a new instance resuming at step t computed pow(beta, t) instead, and every
    update after the resume differed in the last bits. Replaying the steps makes it exact."""
    from types import SimpleNamespace

    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from pipeline.train.engine import replay_cpu_adam_steps

    torch.manual_seed(0)
    grads = [torch.randn(1000) for _ in range(40)]

    def optimizer(weights):
        p = torch.nn.Parameter(weights.clone())
        return p, DeepSpeedCPUAdam([p], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05)

    def train(p, opt, steps):
        for g in steps:
            p.grad = g.clone()
            opt.step()

    p, opt = optimizer(torch.zeros(1000))
    train(p, opt, grads[:30])
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    at_30 = p.detach().clone()
    train(p, opt, grads[30:])

    def resumed(replay):
        q, fresh = optimizer(at_30)
        fresh.state[q] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        if replay:
            replay_cpu_adam_steps(SimpleNamespace(optimizer=fresh, device=torch.device("cpu")))
        train(q, fresh, grads[30:])
        return q.detach()

    assert not torch.equal(resumed(replay=False), p.detach())  # the bug, still in DeepSpeed
    assert torch.equal(resumed(replay=True), p.detach())


@pytest.mark.slow
def test_a_two_rank_run_on_one_machine_listens_on_loopback_only(tmp_path, digits_url):
    """torch's rendezvous store listened on every interface (::) on MASTER_PORT, whatever
    MASTER_ADDR said: a single-machine job's store was open to the network. Every port of the
    launcher and both ranks (store, gloo pairs) is on loopback now."""
    import ipaddress

    from ports import in_group, sockets_of

    config = write_config(
        tmp_path, digits_url, train={"steps": 100000}, checkpoint={"every_steps": 4}
    )
    port = _port()
    launcher = [BIN / "deepspeed", "--num_gpus", 2, "--no_local_rank", "--master_port", port]
    proc = launch([*launcher, "--module", "pipeline.cli", "pretrain", config])
    marker = tmp_path / "run" / "checkpoints" / "step-0000004" / "COMPLETE"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    pids = in_group(proc.pid)
    held = sockets_of(pids)
    os.killpg(proc.pid, signal.SIGTERM)
    wait(proc)
    assert port in {p for *_, p in held}, held  # the store is among them
    assert [s for s in held if not ipaddress.ip_address(s[2]).is_loopback] == []
