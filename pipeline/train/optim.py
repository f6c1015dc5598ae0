"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from pipeline.config import OptimConfig

# Learned tokens and position tables are not shrunk towards zero (as in ViT/timm/big_vision).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "tok_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; norms, biases, position embeddings and tokens without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
