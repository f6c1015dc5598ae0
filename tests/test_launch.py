"""launch/: the deepspeed launcher and SLURM wrappers run the whole job, 2 CPU ranks here.

SLURM is not installed here: `srun` and `scontrol` are stand-ins that do what SLURM does for a
one-node allocation (start SLURM_NTASKS copies with SLURM_PROCID/SLURM_LOCALID set; name the
node), so the test checks the script's own part: ranks, rendezvous and the stages around them.
"""

import json
import os
import signal
import stat
from pathlib import Path

import pytest
from conftest import BIN, free_port
from test_job import job_config, stage_notes
from test_train import finish, kill_when, launch

ROOT = Path(__file__).parent.parent

FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
for i in $(seq 0 $((SLURM_NTASKS - 1))); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM  # srun passes signals on to its tasks
rc=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; code=$?; kill -0 "$p" 2>/dev/null || break; done
  [ $code -eq 0 ] || rc=$code
done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$(dirname "$0")/requeued" ;;
esac
"""


def fake_slurm(tmp_path: Path) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text(FAKE_SCONTROL)
    for f in fake.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return fake


def wrapper_env(tmp_path: Path, **extra: str) -> dict:
    path = f"{tmp_path / 'bin'}:{BIN}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "MASTER_PORT": str(free_port()), **extra}


def check_job(out: str, tmp_path: Path) -> None:
    assert "step 12/12" in out, out[-3000:]
    notes = stage_notes(out)
    assert notes["prepare"] == f"{tmp_path}/data/digits written (train 1438, val 359)"
    assert notes["export"].startswith("done:") and notes["finetune"].startswith("done:")
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| vit-micro-p4 | digits | 12 | digits:val | linear_probe | 1 | top1 |" in table
    assert "| vit-micro-p4 | digits | 12 | digits:val | finetune | - | top1 |" in table


def trained_world(tmp_path: Path) -> int:
    state = tmp_path / "run" / "checkpoints" / "step-0000012" / "trainer.json"
    return json.loads(state.read_text())["world"]


def config(tmp_path: Path) -> Path:
    return job_config(
        tmp_path, str(tmp_path / "data" / "digits"), train={"output": str(tmp_path / "run")},
        eval={"evaluators": ["linear_probe"], "finetune_steps": 8},
        job={"workers": 1, "untrained_baseline": False},
    )  # fmt: skip


@pytest.mark.slow
def test_deepspeed_wrapper_runs_two_ranks_and_the_stages_around_them(tmp_path):
    env = wrapper_env(tmp_path, NUM_GPUS="2")
    out = finish(launch([ROOT / "launch" / "deepspeed.sh", config(tmp_path)], env=env))
    check_job(out, tmp_path)
    assert trained_world(tmp_path) == 2  # pretraining ran on both ranks


@pytest.mark.slow
def test_slurm_script_gives_each_task_its_rank_and_runs_the_stages(tmp_path):
    fake_slurm(tmp_path)
    env = wrapper_env(tmp_path, SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1")
    out = finish(launch(["bash", ROOT / "launch" / "slurm.sbatch", config(tmp_path)], env=env))
    check_job(out, tmp_path)
    assert trained_world(tmp_path) == 2


@pytest.mark.slow
def test_slurm_time_limit_signal_saves_requeues_and_does_not_export(tmp_path):
    """--signal=B:TERM@120: SLURM signals the batch script alone; it passes the signal on,
    every rank saves and exits preempted, and the job goes back to the queue unexported."""
    fake = fake_slurm(tmp_path)
    env = wrapper_env(
        tmp_path, SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="4242"
    )
    more = ["--set", "train.steps=100000", "--set", "checkpoint.every_steps=3"]
    more += ["--set", "data.workers=2"]
    proc = launch(["bash", ROOT / "launch" / "slurm.sbatch", config(tmp_path), *more], env=env)
    marker = tmp_path / "run" / "checkpoints" / "step-0000003" / "COMPLETE"
    out = kill_when(proc, marker, sig=signal.SIGTERM)  # to the script's process only
    assert proc.returncode == 0, out[-3000:]
    assert (fake / "requeued").read_text().split() == ["4242"]
    assert out.count("SIGTERM: saved") == 1 and "requeueing job 4242" in out
    assert "export" not in stage_notes(out) and not (tmp_path / "run" / "export").exists()
