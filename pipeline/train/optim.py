"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.config import OptimConfig
from pipeline.models import Backbone

# Learned tokens and position tables are not shrunk towards zero (as in ViT/timm/big_vision),
# nor Swin's relative position biases (as timm's no_weight_decay).
NO_DECAY_NAMES = (
    "pos_embed", "cls_token", "dist_token", "tok_embed", "relative_position_bias_table",
)  # fmt: skip


def layer_id(name: str, model: Backbone) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the embeddings (a CNN's stem), the
    block's layer for a block (its stage, in a hierarchical model), decay_depth + 1 for the
    final norm and the heads."""
    embeddings = ("stem.", "patch_embed", "cls_token", "dist_token", "pos_embed", "tok_embed")
    if name.startswith(embeddings):
        return 0
    if name.startswith("blocks."):
        return model.decay_layer(int(name.split(".")[1]))
    return model.decay_depth + 1


def param_groups(
    model: Backbone, weight_decay: float, lr: float = 0.0, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups: weights with decay; norms, biases, position embeddings and tokens without.

    layer_decay < 1 (finetuning, as BEiT/MAE): each block's lr is the peak `lr` times
    layer_decay ** (distance from the top), so the embeddings move least and the head most;
    the groups are then split per layer and carry their own "lr".
    """
    depth = model.decay_depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES)
        layer = layer_id(name, model) if layer_decay < 1 else 0
        group = groups.get((layer, no_decay))
        if group is None:
            group = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay}
            if layer_decay < 1:
                group["lr"] = lr * layer_decay ** (depth + 1 - layer)
            groups[(layer, no_decay)] = group
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> multiplier of the peak lr: linear warmup from 0, then cosine, linear or constant
    decay to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        )
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor
