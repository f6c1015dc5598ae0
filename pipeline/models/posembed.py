"""Resample learned position embeddings to a new patch grid, and relative position bias tables
to a new window (resolution change)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], prefix_tokens: int = 1
) -> torch.Tensor:
    """(1, prefix + gh*gw, D) -> (1, prefix + nh*nw, D).

    The prefix ([class] or start token) is kept as is; the grid part is treated as a 2D field
    and resampled bicubically (as the ViT paper does when finetuning at a higher resolution).
    The old grid must be square; the new one may be any shape.
    """
    prefix, grid = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    n = grid.shape[1]
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(
            f"position embedding has {n} grid tokens after {prefix_tokens} prefix tokens, "
            "which is not a square grid"
        )
    if (side, side) == tuple(new_grid):
        return pos_embed.clone()
    dim = grid.shape[-1]
    field = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    field = F.interpolate(field, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = field.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Swin's relative position bias ((2w-1)^2, heads) -> (rows, heads) for another window:
    each head's (2w-1) x (2w-1) grid of offsets resampled bicubically, as Swin does when it
    finetunes at a larger window."""
    side, new = round(table.shape[0] ** 0.5), round(rows**0.5)
    if side * side != table.shape[0] or new * new != rows:
        raise ValueError(f"bias tables of {table.shape[0]} and {rows} rows are not square grids")
    heads = table.shape[1]
    field = table.T.reshape(1, heads, side, side).float()
    field = F.interpolate(field, size=(new, new), mode="bicubic", align_corners=False)
    return field.reshape(heads, rows).T.contiguous().to(table.dtype)
