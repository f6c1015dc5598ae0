"""`tessera export`: a training checkpoint -> safetensors + model config, loadable without
DeepSpeed (`pipeline.models.load_model`) by finetuning, evaluation and other tools.

`read_weights` is the one way finetuning and evaluation take a model: an exported folder, a
complete checkpoint, or a run folder (its newest complete checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import runs
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, create_model, save_model
from pipeline.models.layers import Backbone
from pipeline.models.registry import config_from_dict, weights_mismatch
from pipeline.models.weights import CONFIG_FILE, load_state, read_model_meta
from pipeline.storage import filesystem, join
from pipeline.train import checkpoint
from pipeline.train.engine import consolidated_state_dict


def resolve_checkpoint(path: str | Path, endpoint_url: str = "") -> Path:
    """A run folder (its newest complete checkpoint) or a checkpoint folder that is complete;
    a remote one (s3://...) is downloaded to the run's staging folder first."""
    text = str(path)
    if runs.is_remote(text):
        parent, name = text.rstrip("/").rsplit("/", 1)
        if name.startswith("step-") and parent.endswith(f"/{runs.CHECKPOINTS}"):
            return runs.pull_checkpoint(parent.rsplit("/", 1)[0], name, endpoint_url)
        latest = runs.latest_checkpoint(text, endpoint_url)
        if latest is None:
            raise FileNotFoundError(f"{text}: neither a complete checkpoint nor a run with one")
        return runs.pull_checkpoint(text, latest, endpoint_url)
    path = Path(path)
    if checkpoint.is_complete(path):
        return path
    found = checkpoint.find_latest(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run with one")
    return found


@dataclass
class Weights:
    """A model's weights and where they came from."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    source: str  # the checkpoint or export folder read
    provenance: dict[str, Any]  # model, data (pretraining dataset URL), step, objective

    def build(self, **overrides: Any) -> Backbone:
        """The model with these weights (head and position embeddings adapted to overrides)."""
        from pipeline.models import load_pretrained

        model = create_model(self.config, **overrides)
        load_pretrained(model, self.state, source=self.source)
        return model


def _checkpoint_provenance(ckpt: Path) -> tuple[ModelConfig, dict[str, Any]]:
    state_file = ckpt / checkpoint.STATE
    state = json.loads(state_file.read_text())
    run = parse_config(state["config"], source=str(state_file))
    return run.model, {
        "model": run.model.name,
        "data": run.data.url,
        "step": state["step"],
        "objective": run.train.objective,
        "checkpoint": str(ckpt),
    }


def read_model_config(source: str | Path, endpoint_url: str = "") -> ModelConfig:
    """The model config of what read_weights would read, without reading any weights."""
    text = str(source)
    fs, path = filesystem(text, endpoint_url)
    if fs.exists(join(path, CONFIG_FILE)):
        return config_from_dict(read_model_meta(text, endpoint_url)["config"])
    return _checkpoint_provenance(resolve_checkpoint(text, endpoint_url))[0]


def read_weights(source: str | Path, endpoint_url: str = "") -> Weights:
    """Weights from an exported model folder (any fsspec URL), a complete checkpoint, or a run
    folder. Errors name the source and what it lacks."""
    text = str(source)
    fs, path = filesystem(text, endpoint_url)
    if fs.exists(join(path, CONFIG_FILE)):
        meta = read_model_meta(text, endpoint_url)
        cfg = config_from_dict(meta["config"])
        provenance = {"model": cfg.name, "data": "", "step": 0, "objective": ""}
        provenance.update(meta.get("provenance", {}))
        return Weights(cfg, load_state(text, endpoint_url), text, provenance)
    try:
        ckpt = resolve_checkpoint(text, endpoint_url)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{text}: not an exported model ({CONFIG_FILE}), a complete checkpoint or a run "
            "folder with one"
        ) from None
    cfg, provenance = _checkpoint_provenance(ckpt)
    return Weights(cfg, consolidated_state_dict(ckpt), str(ckpt), provenance)


def read_weights_for(
    source: str | Path, model: ModelConfig, key: str, endpoint_url: str = ""
) -> Weights:
    """read_weights, checked against the model they must initialise; errors name `key` (the
    config key or option that gave `source`) before anything is computed."""
    try:
        weights = read_weights(source, endpoint_url)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    why = weights_mismatch(weights.config, model)
    if why:
        raise ConfigError(
            f"{key}: {weights.source} holds a {weights.config.name} whose weights do not fit "
            f"model {model.name}: {'; '.join(why)} (a checkpoint of another model size?)"
        )
    return weights


def export(source: str | Path, out_url: str, endpoint_url: str = "") -> tuple[Path, Backbone]:
    """Write the weights of `source` (run or checkpoint folder) to `out_url`."""
    ckpt = resolve_checkpoint(source, endpoint_url)
    cfg, provenance = _checkpoint_provenance(ckpt)
    model = create_model(cfg)
    model.load_state_dict(consolidated_state_dict(ckpt), strict=True)
    save_model(model, out_url, provenance=provenance, endpoint_url=endpoint_url)
    return ckpt, model
