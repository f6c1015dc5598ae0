"""The quickstart, shrunk to a few minutes: launch/quickstart.sh itself, with the shipped configs,
on 2000 Fashion-MNIST images and fewer steps. It is interrupted with Ctrl-C during pretraining,
run again (it resumes from the checkpoint), and run a third time (it reuses everything)."""

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import fashion_mnist_subset, free_port
from PIL import Image
from test_job import ROOT, stage_notes
from test_train import finish

from pipeline import runs
from pipeline.evaluate.results import read_rows

pytestmark = pytest.mark.ray

# The same configs, smaller: what changes is the amount of work, not the code path.
SHRINK = [
    "train.steps=100", "train.global_batch_size=32", "optim.warmup_steps=10", "checkpoint.every_steps=10",
    "logging.every_steps=10", "job.finetune_steps=10", "eval.train_samples=500",
    "eval.test_samples=300", "eval.shots=[1, 5]", "prepare.0.samples_per_shard=500",
]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    images = tmp / "fashion-mnist"
    images.mkdir()
    fashion_mnist_subset(images, 2000, 500)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        FASHION_MNIST=str(images), QUICKSTART_ROOT=str(tmp), TESSERA_DEV_STATE=str(tmp / "dev"),
        RAY_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()), RAY_CPUS="2",
        RAY_AGENT_PORT=str(free_port()),
    )  # fmt: skip
    args = [ROOT / "launch" / "quickstart.sh"] + [a for s in SHRINK for a in ("--set", s)]
    return tmp, env, args


def _as_from_a_terminal() -> None:
    """SIGINT handled by default, as in a terminal. A test run started in the background (`cmd
    &` in a script, as CI harnesses may) passes SIGINT on ignored, and bash cannot trap a
    signal that was ignored when it started: the quickstart then never saw the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, env) -> subprocess.Popen:
    """The script as a user runs it: its own process group (Ctrl-C reaches all of it)."""
    return subprocess.Popen(
        list(map(str, args)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )  # fmt: skip


def by_config(out: str) -> dict[str, str]:
    """The job log cut into each config's part."""
    parts = re.split(r"^tessera run: (quickstart-\w+): stages", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def dashboard_answers(env: dict) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{env['DASHBOARD_PORT']}", timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_quickstart_interrupted_resumed_and_reused(quickstart):
    tmp, env, args = quickstart
    vit, igpt = tmp / "runs/quickstart/vit", tmp / "runs/quickstart/igpt"

    # Ctrl-C once the ViT has its first checkpoint: the script stops its Ray head on the way out.
    proc = start(args, env)
    deadline = time.monotonic() + 600
    while runs.latest_checkpoint(str(vit)) is None:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no ViT checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired as e:  # say what was still running, then clean up
        ps = ["ps", "-eo", "pid,ppid,pgid,stat,etime,args", "--forest"]
        tree = subprocess.run(ps, capture_output=True, text=True).stdout
        subprocess.run([str(ROOT / "infra" / "dev-services.sh"), "stop"], env=env, cwd=ROOT)
        os.killpg(proc.pid, signal.SIGKILL)
        shown = (e.output or b"")[-3000:]
        raise AssertionError(f"still running 120 s after Ctrl-C:\n{tree}\n{shown}") from None
    assert proc.returncode != 0
    interrupted_at = int(runs.latest_checkpoint(str(vit)).split("-")[-1])
    assert interrupted_at < 100, out[-3000:]
    assert "fashion-mnist written (train 1834, test 500, val 166)" in out  # val by class
    assert not dashboard_answers(env), "the quickstart left its Ray head running"

    # Again: prepare is reused, pretraining resumes at the checkpoint, everything else runs.
    # On new ports: the kernel may have lent the old ones to another test's connections since.
    env = {**env, "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
           "RAY_AGENT_PORT": str(free_port())}  # fmt: skip
    out = finish(start(args, env))
    parts = by_config(out)
    notes = stage_notes(parts["quickstart-vit"])
    data = tmp / "runs/data"
    assert notes["prepare"] == f"{data}/fashion-mnist complete; {data}/digits complete", out[-3000:]
    assert f"resumed from {vit}/checkpoints/step-{interrupted_at:07d}" in parts["quickstart-vit"]
    assert notes["pretrain"] == f"done: {vit}/checkpoints/step-0000100"
    assert stage_notes(parts["quickstart-igpt"])["prepare"].endswith("fashion-mnist complete")

    # Every row of the table, trained and untrained, next to the raw-pixel baselines.
    want_vit = {
        ("fashion-mnist:test", "linear_probe", "3", "top1"),
        ("fashion-mnist:test", "fewshot", "3", "1-shot top1"),
        ("fashion-mnist:test", "fewshot", "3", "5-shot top1"),
        ("fashion-mnist:test", "knn", "3", "top1"),
        ("fashion-mnist:test", "pixels", "-", "top1"),
        ("digits:val", "linear_probe", "3", "top1"),
        ("digits:val", "fewshot", "3", "5-shot top1"),
        ("digits:val", "knn", "3", "top1"),
        ("digits:val", "pixels", "-", "top1"),
    }
    # ImageGPT's probes compete (every block, and all four side by side): each on val, and
    # test read for the one val chose alone; raw pixels at full resolution and as it sees them.
    want_igpt = {("fashion-mnist:val", "linear_probe", str(i), "top1") for i in range(4)}
    want_igpt |= {("fashion-mnist:val", "linear_probe", "0+1+2+3", "top1"),
                  ("fashion-mnist:test", "pixels", "-", "top1"),
                  ("fashion-mnist:test", "pixels", "model input (14 px, 16 colours)", "top1")}  # fmt: skip
    for run, want, model in ((vit, want_vit, "vit-hybrid-mini"), (igpt, want_igpt, "igpt-tiny")):
        rows = read_rows(run)
        for untrained in (False, True):
            name = f"{model} (untrained)" if untrained else model
            have = {(r.target, r.evaluator, r.layer, r.metric) for r in rows if r.model == name}
            assert want <= have, (name, sorted(want - have))
            if run == igpt:  # one probe read on test: the one chosen on val
                (chosen,) = [r for r in rows if r.model == name and r.target == "fashion-mnist:test"
                             and r.evaluator == "linear_probe"]  # fmt: skip
                assert chosen.selected_on.startswith("val (block, pooling)")
        assert all(r.baseline is not None for r in rows if r.evaluator != "finetune")
        table = (run / "results.md").read_text()
        assert table in out  # printed at the end of the job
        assert f"tensorboard --logdir {run}/tensorboard" in out
        with Image.open(run / "curves.png") as curves:  # the ViT's: pretraining, finetuning, lr
            assert curves.size == ((1280, 640) if run == vit else (1280, 320))
    # The finetune's before/after on val; test read once after its last step, for the report.
    finetuned = {r.target: r for r in read_rows(vit) if r.evaluator == "finetune"}
    assert set(finetuned) == {"fashion-mnist:val", "fashion-mnist:test"}
    assert finetuned["fashion-mnist:val"].reported_on == "val (data.val_split)"
    assert finetuned["fashion-mnist:val"].extra["initial_top1"] is not None
    assert finetuned["fashion-mnist:test"].reported_on == "test (final)"
    assert list((vit / "images").glob("attention_rollout-step-0000100.png"))
    assert list((igpt / "images").glob("completions-step-0000100.png"))
    assert not dashboard_answers(env)

    # A third time reuses every stage's output.
    out = finish(start(args, env))
    for name, part in by_config(out).items():
        for stage, note in stage_notes(part).items():
            if stage == "prepare":
                assert "written" not in note, (name, note)
            elif stage == "evaluate":
                assert note.count("skipped") == 2, (name, note)
            else:
                assert note.startswith("skipped"), (name, stage, note)
    assert "step 10/100" not in out
