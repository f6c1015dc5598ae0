"""Run `tessera pretrain CONFIG [ARGS]` and record the keys of every batch it draws.

    TESSERA_TEST_KEYS=FOLDER TESSERA_TEST_LAUNCH=N python tests/record_keys.py CONFIG [ARGS]

Appends {"launch", "rank", "step", "keys"} JSON lines to FOLDER/keys-N-rank<r>.jsonl, one per
micro-batch, `step` being the optimizer step the batch is drawn for. TESSERA_TEST_DIE_AT=R:S
also SIGKILLs rank R as it draws the first batch of step S (a node lost mid-run). Ray Train
workers get the same recording from tests/ray_hook/sitecustomize.py, which calls `install`.
Used by tests only: the production code has no hook for this.
"""

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def install(trainer, launch: Callable[[], int]) -> None:
    """Wrap trainer.Trainer.train_step so that every batch it draws is recorded; `launch()`
    numbers the launch (a later launch that runs a step again replaces what an earlier drew)."""
    folder = Path(os.environ["TESSERA_TEST_KEYS"])
    die = os.environ.get("TESSERA_TEST_DIE_AT")
    die_at = tuple(map(int, die.split(":"))) if die else None
    real_train_step = trainer.Trainer.train_step

    class Recorded:
        def __init__(self, batches, step: int, rank: int) -> None:
            self.batches, self.step, self.rank = batches, step, rank

        def __iter__(self):
            return self

        def __next__(self):
            if die_at == (self.rank, self.step):
                print(f"KILL rank {self.rank} at step {self.step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            batch = next(self.batches)
            n = launch()
            line = {"launch": n, "rank": self.rank, "step": self.step, "keys": list(batch["key"])}
            with open(folder / f"keys-{n}-rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            return batch

    def train_step(self, batches):
        return real_train_step(self, Recorded(batches, self.step + 1, self.rank))

    trainer.Trainer.train_step = train_step


if __name__ == "__main__":
    from pipeline import cli
    from pipeline.train import trainer

    install(trainer, lambda: int(os.environ["TESSERA_TEST_LAUNCH"]))
    sys.exit(cli.main(["pretrain", *sys.argv[1:]]))
