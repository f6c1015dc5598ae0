"""What recording sha256 digests in COMPLETE adds to a checkpoint save, side by side in one run.

    .venv/bin/python benchmarks/checkpoint_digest.py [--params 86e6] [--ranks 1]

A checkpoint of a model with `--params` parameters as DeepSpeed writes it with Adam under ZeRO:
the bf16 weights and, per rank, its 1/ranks share of the fp32 master weights and both moments
(14 bytes a parameter in all), written with torch.save and fsynced. Measured, each the best of
three:
  save      torch.save of every file, then fsync (what a save cost before digests)
  digest    checkpoint.digest of every file just written (from the page cache), one rank's
            share when --ranks > 1 (the ranks that see a folder split its files)
The ratio digest / save is what the digests add to the time training waits for a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.train import checkpoint


def write(folder: Path, params: int, ranks: int) -> list[Path]:
    folder.mkdir(parents=True)
    files = [folder / "mp_rank_00_model_states.pt"]
    torch.save({"module": torch.zeros(params, dtype=torch.bfloat16)}, files[0])
    share = params // ranks
    for r in range(ranks):
        path = folder / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        torch.save({"fp32": torch.ones(share), "exp_avg": torch.ones(share),
                    "exp_avg_sq": torch.ones(share)}, path)  # fmt: skip
        files.append(path)
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return files


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=86e6)
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args()
    params, ranks = int(args.params), args.ranks
    root = Path(tempfile.mkdtemp(prefix="tessera-digest-"))
    try:
        files: list[Path] = []

        def save() -> None:
            shutil.rmtree(root / "ckpt", ignore_errors=True)
            files[:] = write(root / "ckpt", params, ranks)

        save_s = best(save)
        mine = files[0::ranks]  # one rank's share of the folder's files
        digest_s = best(lambda: [checkpoint.digest(f) for f in mine])
        size = sum(f.stat().st_size for f in files)
        mine_size = sum(f.stat().st_size for f in mine)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"checkpoint of {params / 1e6:.0f}M parameters, {ranks} rank(s): {size / 1e9:.2f} GB")
    print(f"{'step':<8}{'seconds':>10}{'GB/s':>8}")
    print(f"{'save':<8}{save_s:>10.3f}{size / 1e9 / save_s:>8.2f}")
    print(f"{'digest':<8}{digest_s:>10.3f}{mine_size / 1e9 / digest_s:>8.2f}")
    ratio = digest_s / save_s
    print(f"digests add {100 * ratio:.0f}% to the save")
    print(json.dumps({"params": params, "ranks": ranks, "checkpoint_gb": round(size / 1e9, 3),
                      "save_s": round(save_s, 3), "digest_s": round(digest_s, 3),
                      "digest_vs_save_ratio": round(ratio, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
