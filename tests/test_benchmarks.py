"""The scripts in benchmarks/ that run where tests cannot (a GPU) still work end to end here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_rehearsal_kills_resumes_and_reports_each_model_on_cpu_with_tiny_sizes():
    """The same script, run on a GPU, pretrains ViT-B/16 and iGPT-S with NCCL."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--rehearse", "--smoke"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("vit-micro-p4", "igpt-micro"):
        assert f"{name}_error" not in figures, figures
        # Killed once step 4's checkpoint was complete; step 8's may have finished behind
        # training before the kill landed: the resume takes the newest complete one.
        assert figures[f"{name}_resumed_at"] == figures[f"{name}_complete_at_kill"] in (4, 8)
        assert figures[f"{name}_images_per_s"] > 0 and figures[f"{name}_mfu"] > 0


@pytest.mark.slow
def test_data_scale_study_shrunk_to_two_models_and_one_size(tmp_path):
    """benchmarks/data_scale.py, its by-hand run shrunk: a ResNet and the DeiT distilled from
    it, 200 images, a tiny budget, both learning rates each, 500 val and test images."""
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_scale.py"), "--sizes", "200",
         "--models", "resnet", "deit", "--budget-tflop", "0.05", "--eval-images", "500",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures["test_top1"]) == {"resnet", "deit"}
    assert all(0 <= v <= 100 for by in figures["test_top1"].values() for v in by.values())
    assert figures["chosen_lr"]["deit"]["200"] in (1e-3, 3e-3)
    assert any(line.startswith("deit") for line in lines)
    assert (out / "data_scale.png").stat().st_size > 1000
    assert json.loads((out / "data_scale.json").read_text()) == figures
