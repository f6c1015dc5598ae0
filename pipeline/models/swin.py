"""Swin Transformer, as in "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows" (Liu et al., 2021).

Image (B, C, H, W) -> P x P patches, embedded and normalised -> four stages of pre-norm blocks
on a (B, H', W', D) map, each attending within non-overlapping w x w windows, every second block
with the windows shifted by w/2 (a cyclic roll, with a mask so that pixels rolled across the
border do not attend to each other); a learned bias per head for each relative offset inside a
window -> between stages, patch merging: each 2x2 neighbourhood's features concatenated (4D),
normalised and projected to 2D -> final LayerNorm -> average over the map -> head.

A stage whose map is no larger than the window attends over the whole map, unshifted (timm's
rule; at 224 px with window 7 the last stage's 7x7 map is one window). Layout and names follow
timm's `SwinTransformer` (NHWC maps, `layers.S.blocks.J` there, one flat `blocks` list here).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import require
from pipeline.models.layers import (
    Backbone,
    DropPath,
    Linear,
    Mlp,
    PatchEmbed,
    TrainFlops,
    class_head,
    uses_fused_attention,
)

MASKED = -100.0  # added to the scores of pixel pairs a shifted window must not join (as timm)


@dataclass(frozen=True)
class SwinConfig(TrainFlops):
    """Architecture of one Swin Transformer; a registry name fills it."""

    family: ClassVar[str] = "swin"

    name: str = "swin"
    image_size: int = 224
    channels: int = 3
    patch_size: int = 4
    width: int = 96  # channels of the first stage (C); each stage doubles it
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7  # window side, in tokens
    mlp_ratio: int = 4
    num_classes: int = 1000
    head_bias: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear from 0)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "heads", tuple(self.heads))
        for key in ("image_size", "channels", "patch_size", "width", "window", "mlp_ratio"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        require(
            len(self.depths) > 0 and all(d > 0 for d in self.depths),
            "depths", list(self.depths), "must be one or more positive block counts",
        )  # fmt: skip
        require(
            len(self.heads) == len(self.depths), "heads", list(self.heads),
            f"needs one count per stage ({len(self.depths)})",
        )  # fmt: skip
        require(
            self.image_size % self.patch_size == 0, "image_size", self.image_size,
            f"must be a multiple of patch_size={self.patch_size}",
        )  # fmt: skip
        for i in range(len(self.depths)):
            side, w = self.side(i), self.stage_window(i)
            require(
                side > 0 and side % w == 0 and (i == 0 or self.side(i - 1) % 2 == 0),
                "image_size", self.image_size,
                f"gives stage {i} a {side}x{side} map, which windows of {w} do not tile (each "
                f"stage halves the {self.grid}x{self.grid} patch grid; choose image_size, "
                "patch_size and window so that they do)",
            )  # fmt: skip
            require(
                self.stage_width(i) % self.heads[i] == 0, "heads", list(self.heads),
                f"stage {i}'s {self.heads[i]} heads must divide its width {self.stage_width(i)}",
            )  # fmt: skip
        require(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        require(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "must be in [0, 1)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def side(self, stage: int) -> int:
        """Side of the stage's map, in tokens."""
        return self.grid // 2**stage

    def stage_width(self, stage: int) -> int:
        return self.width * 2**stage

    def stage_window(self, stage: int) -> int:
        return min(self.window, self.side(stage))

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def final_side(self) -> int:
        return self.side(len(self.depths) - 1)

    @property
    def final_width(self) -> int:
        return self.stage_width(len(self.depths) - 1)

    def blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """(stage, side, window, shift) of every block, in order."""
        for i, n in enumerate(self.depths):
            side, w = self.side(i), self.stage_window(i)
            for j in range(n):
                shift = w // 2 if j % 2 == 1 and side > self.window else 0
                yield i, side, w, shift

    def largest_weight(self) -> int:
        """Elements of the largest weight tensor (sizes DeepSpeed's ZeRO-3 buckets): the last
        stage's MLP, or the head."""
        c = self.final_width
        return max(self.mlp_ratio * c * c, c * self.num_classes)

    def largest_block(self) -> int:
        """Weights of the largest block (what ZeRO-3 gathers at once): the last stage's first,
        with its patch merging."""
        c = self.final_width
        return (4 + 2 * self.mlp_ratio) * c * c + 2 * c * c

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (2 per MAC): the patch embedding; per block the
        qkv and output projections, scores and weighted sums inside each window, the MLP; patch
        merging; the head."""
        macs = self.grid**2 * self.patch_size**2 * self.channels * self.width
        for i, side, w, _ in self.blocks():
            n, c = side**2, self.stage_width(i)
            macs += 4 * n * c * c + 2 * n * w * w * c + 2 * n * c * self.mlp_ratio * c
        for i in range(1, len(self.depths)):
            macs += self.side(i) ** 2 * 4 * self.stage_width(i - 1) * self.stage_width(i)
        return 2 * macs + 2 * self.final_width * self.num_classes


def relative_position_index(window: int) -> torch.Tensor:
    """(w^2, w^2) index into the ((2w-1)^2, heads) bias table of each pair's relative offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """(windows, w^2, w^2): 0 where two tokens of a shifted window came from the same region of
    the unrolled map, MASKED where the roll brought them together from opposite borders."""
    region = torch.zeros(side, side)
    bounds = ((0, side - window), (side - window, side - shift), (side - shift, side))
    n = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region[h0:h1, w0:w1] = n
            n += 1
    windows = partition(region[None, :, :, None], window).flatten(1)  # (windows, w^2)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff == 0, 0.0, MASKED)


def partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, w, w, C), windows in raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c)


def unpartition(windows: torch.Tensor, window: int, side: int) -> torch.Tensor:
    """Inverse of `partition` for a side x side map."""
    c = windows.shape[-1]
    x = windows.view(-1, side // window, side // window, window, window, c).permute(
        0, 1, 3, 2, 4, 5
    )
    return x.reshape(-1, side, side, c)


class WindowAttention(nn.Module):
    """Multi-head attention inside each window, with a learned bias per relative offset;
    x: (B * windows, w^2, D) -> the same."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-0.04, b=0.04)
        # Rebuilt from the window, never saved (timm does not save it either).
        self.register_buffer("relative_position_index", relative_position_index(window), False)

    def bias(self) -> torch.Tensor:
        """(heads, w^2, w^2) bias of the window's token pairs."""
        n = self.window**2
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, d = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias().to(x.dtype)[None]  # (1, heads, n, n)
        if mask is not None:  # (windows, n, n), the same for every image
            windows = mask.shape[0]
            bias = (bias.view(1, 1, self.heads, n, n) + mask.to(x.dtype)[None, :, None]).expand(
                bw // windows, -1, -1, -1, -1
            ).reshape(bw, self.heads, n, n)  # fmt: skip
        if uses_fused_attention(x.device, x.dtype):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, d))


class PatchMerging(nn.Module):
    """(B, H, W, D) -> (B, H/2, W/2, 2D): each 2x2 neighbourhood's features concatenated
    (timm's order), normalised, projected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinBlock(nn.Module):
    """(B, H, W, D_in) -> (B, H', W', D): patch merging first if this block opens a stage after
    the first; then x + attn(LN(x)) in (shifted) windows, x + mlp(LN(x))."""

    def __init__(
        self, dim: int, heads: int, side: int, window: int, shift: int, mlp_dim: int,
        drop_path: float, merge: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.window, self.shift, self.side = window, shift, side
        self.downsample = PatchMerging(dim // 2) if merge else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(side, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, False)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        side, c = x.shape[1], x.shape[3]
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        windows = partition(x, self.window).view(-1, self.window**2, c)
        out = self.attn(windows, self.attn_mask)
        x = unpartition(out.view(-1, self.window, self.window, c), self.window, side)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinPatchEmbed(nn.Module):
    """Image (B, C, H, W) -> normalised patch embeddings (B, H/P, W/P, D)."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = PatchEmbed(channels, dim, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(Backbone):
    """The blocks of all stages form one list (`blocks`), patch merging inside the first block
    of each later stage, so that checkpointing, `forward_features(layers=...)` and probes index
    blocks as for a ViT; layer-wise lr decay goes by stage."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__(cfg.final_width)
        self.cfg = cfg
        self.patch_embed = SwinPatchEmbed(cfg.channels, cfg.width, cfg.patch_size)
        blocks, self.stage_of = [], []
        for n, (i, side, window, shift) in enumerate(cfg.blocks()):
            rate = cfg.drop_path * n / max(cfg.depth - 1, 1)
            d = cfg.stage_width(i)
            merge = i > 0 and (not self.stage_of or self.stage_of[-1] != i)
            blocks.append(
                SwinBlock(d, cfg.heads[i], side, window, shift, cfg.mlp_ratio * d, rate, merge)
            )
            self.stage_of.append(i)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.final_width)
        self.head = class_head(cfg.final_width, cfg.num_classes, cfg.head_bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the first stage's map (B, H/P, W/P, D)."""
        self.check_images(x)
        return self.patch_embed(x)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps (B, H, W, D) -> their average (B, D)."""
        return maps.mean(dim=(1, 2))

    def spatial(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps (B, H, W, D) -> (B, D, H, W)."""
        return maps.permute(0, 3, 1, 2)
