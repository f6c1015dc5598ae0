"""Run on 2 ranks under the deepspeed launcher by test_plan.py: the bytes of every live tensor on
rank 0 at the moment model states peak (gradients reduced, before the optimizer step), printed
as JSON. Usage: plan_states.py CONFIG KEY=VALUE..."""

import gc
import json
import sys

import torch

from pipeline.config import load_config
from pipeline.train.trainer import Trainer


def live_tensor_bytes() -> int:
    """Every tensor Python can reach, each storage counted once (views share one)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


before = live_tensor_bytes()
trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]), resume="never", log=lambda *_: None)
batches = iter(trainer.stream)
trainer.train_step(batches)  # Adam's m and v exist from the first step on
seen = []
step = trainer.engine.step


def measured_step(*args, **kwargs):
    seen.append(live_tensor_bytes())
    return step(*args, **kwargs)


trainer.engine.step = measured_step
trainer.train_step(batches)
if trainer.rank == 0:
    print(json.dumps({"model_states": seen[-1] - before}))
trainer.close()
