"""Quickstart finetune recipes: validation top-1 after finetuning one pretrained run's export
with variants of its finetune stage, over seeds.

    .venv/bin/python benchmarks/finetune_recipe.py --root DIR [--config configs/quickstart-vit.yaml]
        [--variant "optim.lr=2e-4 optim.layer_decay=0.75" ...] [--seeds 0 1 2] [--parallel 2]
        [--work DIR] [--final]

DIR is the TESSERA_ROOT of the config's pretraining, exported, as the quickstart leaves it:
    TESSERA_ROOT=DIR tessera run CONFIG --set "job.stages=[prepare,pretrain,export]"

The baseline is the config's own finetune stage: `tessera run`'s finetune config
(pipeline.orchestrate.job.finetune_run: the export, the pretraining data as classes,
job.finetune_steps and the job.finetune overrides); each --variant adds overrides to it. Every
(variant, seed) is `tessera finetune` of that config in a process of its own on one core, one
rank with the config's global batch, train.seed set to the seed (data order and any new head),
through the real shards and loader. Variants are compared by mean validation top-1 over the
seeds (the finetune's own "after" number on data.val_split, val).

Choose on validation, report test once: the study's runs do not read test (the stage's
finetune.report_split is emptied). With --final, the chosen variant's seeds are finetuned
again with report_split test, which reads test once after the last step; each must first give
the validation top-1 its study run gave (the same training), or the script stops.

With --work, each (variant, seed) keeps its run folder in DIR and a later study reuses it
(recorded with the same config, root and variant).

Prints one row per variant (mean and spread of validation top-1 over the seeds, its difference
to the baseline, seconds per run), the chosen variant, with --final its test top-1, and ends
with a JSON line: {"val_top1_mean": {...}, "val_top1_std": {...}, "val_top1_vs_baseline": {...},
"seconds": {...}, "chosen": ..., "test_top1_chosen": {...} (--final only)}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TESSERA = str(Path(sys.executable).parent / "tessera")
sys.path.insert(0, str(Path(__file__).parent))
from vit_recipe import job_folder, report  # noqa: E402


def stage_config(config: str, root: str, overrides: list[str]) -> dict:
    """The finetune stage's config (as `tessera run` makes it) with `overrides` last, as the
    raw dict `tessera finetune` reads."""
    from pipeline.config import config_to_raw, load_config, parse_config
    from pipeline.orchestrate.job import absolute_paths, finetune_run

    run = parse_config(absolute_paths(config_to_raw(load_config(config)), root))  # as `tessera run`
    stage = finetune_run(run)
    return config_to_raw(parse_config(config_to_raw(stage), overrides=overrides))


def val_and_test(output: Path) -> tuple[float, float | None]:
    """(top-1 on val, top-1 on test if the run reported it) from a finetune's results rows."""
    from pipeline.evaluate.results import read_rows

    rows = [r for r in read_rows(output) if r.evaluator == "finetune"]
    val = [r.value for r in rows if r.target.endswith(":val")]
    test = [r.value for r in rows if r.target.endswith(":test")]
    if len(val) != 1:
        sys.exit(f"{output}: {len(val)} finetune rows on val, expected one")
    return 100 * val[0], (100 * test[0] if test else None)


def finetune(
    config: str, root: str, variant: str, seed: int, out: Path, final: bool = False
) -> dict:
    """One (variant, seed): `tessera finetune` in a one-thread process writing to `out`, or its
    result kept there by an earlier study."""
    result = out / "result.json"
    key = {"config": config, "root": root, "variant": variant, "final": final}
    if result.exists():
        kept = json.loads(result.read_text())
        if all(kept.get(k) == v for k, v in key.items()):
            return kept
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = [*variant.split(), f"train.seed={seed}", f"train.output={out / 'run'}"]
    overrides.append(f"finetune.report_split={'test' if final else ''}")
    raw = stage_config(config, root, overrides)
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TESSERA_ROOT": root}
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # one rank, on a free port
    start = time.perf_counter()
    proc = subprocess.run(
        [TESSERA, "finetune", str(out / "config.yaml")], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"variant {variant!r} seed {seed} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    val, test = val_and_test(out / "run")
    kept = {**key, "val_top1": val, "test_top1": test, "seconds": seconds}
    result.write_text(json.dumps(kept))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="TESSERA_ROOT of the exported pretraining")
    parser.add_argument("--config", default="configs/quickstart-vit.yaml")
    parser.add_argument("--variant", action="append", default=[], help="overrides, space-separated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--final",
        action="store_true",
        help="finetune the variant chosen on val again, reading test once",
    )
    parser.add_argument("--work", help="keep each run here; reuse them")
    args = parser.parse_args()
    config, root = str(Path(args.config).resolve()), str(Path(args.root).resolve())

    names = ["baseline", *args.variant]
    variants = ["", *args.variant]
    jobs = [(v, seed) for v in variants for seed in args.seeds]
    with (
        tempfile.TemporaryDirectory() as scratch,
        ThreadPoolExecutor(max(1, args.parallel)) as pool,
    ):
        work = Path(args.work or scratch)
        folder = {job: job_folder(work, *job) for job in jobs}
        runs = pool.map(lambda job: finetune(config, root, *job, folder[job]), jobs)
        results = dict(zip(jobs, runs, strict=True))
        val = {
            n: [results[v, s]["val_top1"] for s in args.seeds]
            for n, v in zip(names, variants, strict=True)
        }
        mean = {n: statistics.mean(v) for n, v in val.items()}
        spread = {n: statistics.stdev(v) if len(v) > 1 else 0.0 for n, v in val.items()}
        chosen = max(names, key=mean.get)
        test = {}
        if args.final:
            v = variants[names.index(chosen)]
            for s in args.seeds:
                final_dir = folder[v, s].with_name(folder[v, s].name + "--final")
                again = finetune(config, root, v, s, final_dir, final=True)
                if again["val_top1"] != results[v, s]["val_top1"]:
                    sys.exit(
                        f"{final_dir}: val {again['val_top1']:.2f} where the study's run gave "
                        f"{results[v, s]['val_top1']:.2f}: not the same training; test not used"
                    )
                test[s] = again["test_top1"]

    seconds = {
        n: statistics.mean(results[v, s]["seconds"] for s in args.seeds)
        for n, v in zip(names, variants, strict=True)
    }
    title = (f"{args.config}'s finetune stage from {root}: val top-1, seeds "
             f"{' '.join(map(str, args.seeds))}, one core per run")  # fmt: skip
    report(title, args.seeds, names, mean, spread, chosen, [("seconds", seconds, "seconds")], test)


if __name__ == "__main__":
    main()
