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
