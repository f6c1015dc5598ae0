"""Run on 2 ranks under the deepspeed launcher by test_plan.py: the bytes of every live tensor on
rank 0 at the moment model states peak (gradients reduced, before the optimizer step), printed
as JSON. Usage: plan_states.py CONFIG KEY=VALUE..."""

import json
import sys

from pipeline.config import load_config
from pipeline.plan import live_tensor_bytes
from pipeline.train.trainer import Trainer

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
# Stop the DataLoader workers now, as Trainer.train does on return, not at interpreter exit
# after the process group is gone (a rank once aborted there: "terminate called without an
# active exception").
batches.close()
trainer.close()
