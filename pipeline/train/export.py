"""`tessera export`: a training checkpoint -> safetensors + model config, loadable without
DeepSpeed (`pipeline.models.load_model`) by finetuning, evaluation and other tools."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import parse_config
from pipeline.models import create_model, save_model
from pipeline.models.layers import Backbone
from pipeline.train import checkpoint
from pipeline.train.engine import consolidated_state_dict


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its newest complete checkpoint) or a checkpoint folder that is complete."""
    path = Path(path)
    if checkpoint.is_complete(path):
        return path
    found = checkpoint.find_latest(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run with one")
    return found


def export(source: str | Path, out_url: str) -> tuple[Path, Backbone]:
    """Write the weights of `source` (run or checkpoint folder) to `out_url`."""
    ckpt = resolve_checkpoint(source)
    state_file = ckpt / checkpoint.STATE
    run = parse_config(json.loads(state_file.read_text())["config"], source=str(state_file))
    model = create_model(run.model)
    model.load_state_dict(consolidated_state_dict(ckpt), strict=True)
    save_model(model, out_url)
    return ckpt, model
