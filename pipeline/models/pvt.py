"""Pyramid Vision Transformer, as in "Pyramid Vision Transformer: A Versatile Backbone for Dense
Prediction without Convolutions" (Wang et al., 2021; PVT v1).

Image (B, C, H, W) -> four stages, each opened by a patch embedding (a P x P stride-P
convolution and LayerNorm: P = 4, then 2, 2, 2, so the map shrinks 4x, 8x, 16x, 32x) and its
own learned position embeddings, the last stage with a [class] token -> pre-norm blocks whose
attention is spatial-reduction attention: queries from every token, keys and values from the
map shrunk R x R by a stride-R convolution (R = 8, 4, 2, 1), so the first stages' long sequences
cost N^2 / R^2, not N^2 -> final LayerNorm -> head on the [class] token.

The blocks of all stages form one list; a stage's first block embeds its patches. The paper's
code names are kept inside a block (`attn.q`, `attn.kv`, `attn.sr`, `attn.norm`).
"""

from __future__ import annotations

import math
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
from pipeline.models.posembed import resample_pos_embed


@dataclass(frozen=True)
class PVTConfig(TrainFlops):
    """Architecture of one PVT; a registry name fills it."""

    family: ClassVar[str] = "pvt"

    name: str = "pvt"
    image_size: int = 224
    channels: int = 3
    widths: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)
    reductions: tuple[int, ...] = (8, 4, 2, 1)  # spatial reduction R of keys and values
    patches: tuple[int, ...] = (4, 2, 2, 2)  # patch side of each stage's embedding
    num_classes: int = 1000
    head_bias: float = 0.0
    drop_path: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("widths", "depths", "heads", "mlp_ratios", "reductions", "patches"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
            values = getattr(self, key)
            require(
                len(values) == len(self.depths) and all(v > 0 for v in values), key,
                list(values), f"needs one positive value per stage ({len(self.depths)})",
            )  # fmt: skip
        require(self.image_size > 0 and self.channels > 0, "image_size", self.image_size, "> 0")
        side = self.image_size
        for i in range(len(self.depths)):
            require(
                side % self.patches[i] == 0, "image_size", self.image_size,
                f"gives stage {i} a {side} px map, which patches of {self.patches[i]} do not tile",
            )  # fmt: skip
            side //= self.patches[i]
            require(
                side % self.reductions[i] == 0, "reductions", list(self.reductions),
                f"stage {i}'s {side}x{side} map does not shrink by {self.reductions[i]}",
            )  # fmt: skip
            require(
                self.widths[i] % self.heads[i] == 0, "heads", list(self.heads),
                f"stage {i}'s {self.heads[i]} heads must divide its width {self.widths[i]}",
            )  # fmt: skip
        require(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        require(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "must be in [0, 1)")

    def side(self, stage: int) -> int:
        """Side of the stage's map, in tokens."""
        side = self.image_size
        for p in self.patches[: stage + 1]:
            side //= p
        return side

    def tokens(self, stage: int) -> int:
        """Sequence length of the stage: its map, and the [class] token in the last."""
        return self.side(stage) ** 2 + (stage == len(self.depths) - 1)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def final_width(self) -> int:
        return self.widths[-1]

    @property
    def final_side(self) -> int:
        return self.side(len(self.depths) - 1)

    def blocks(self) -> Iterator[tuple[int, int, int]]:
        """(stage, tokens, key/value tokens) of every block, in order."""
        for i, n in enumerate(self.depths):
            r = self.reductions[i]
            kv = self.tokens(i) if r == 1 else (self.side(i) // r) ** 2
            for _ in range(n):
                yield i, self.tokens(i), kv

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (2 per MAC): patch embeddings; per block the
        query, reduction convolution, key/value and output projections, scores and sums over
        the reduced keys, the MLP; the head."""
        macs, c_in = 0, self.channels
        for i in range(len(self.depths)):
            macs += self.side(i) ** 2 * self.patches[i] ** 2 * c_in * self.widths[i]
            c_in = self.widths[i]
        for i, n, kv in self.blocks():
            c, r = self.widths[i], self.reductions[i]
            sr = (self.side(i) // r) ** 2 * r * r * c * c if r > 1 else 0
            macs += 2 * n * c * c + sr + 2 * kv * c * c + 2 * n * kv * c
            macs += 2 * n * c * self.mlp_ratios[i] * c
        return 2 * macs + 2 * self.final_width * self.num_classes

    def largest_weight(self) -> int:
        c, i = self.final_width, len(self.depths) - 1
        return max(self.mlp_ratios[i] * c * c, max(self.reductions[j] ** 2 * self.widths[j] ** 2
                   for j in range(len(self.depths))), c * self.num_classes)  # fmt: skip

    def largest_block(self) -> int:
        return max(
            (
                4
                + 2 * self.mlp_ratios[i]
                + (self.reductions[i] ** 2 if self.reductions[i] > 1 else 0)
            )
            * self.widths[i] ** 2
            for i in range(len(self.depths))
        )


class SRAttention(nn.Module):
    """Spatial-reduction attention; x: (B, N, D) over a side x side map (after a [class] token
    in the last stage, which takes part unreduced only where R is 1) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads, self.reduction = heads, reduction
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        if reduction > 1:
            self.sr = nn.Conv2d(dim, dim, reduction, stride=reduction)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        source = x
        if self.reduction > 1:  # the map's tokens are the last side^2
            grid = x[:, n - side * side :].transpose(1, 2).reshape(b, d, side, side)
            source = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(source).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        if uses_fused_attention(x.device, x.dtype):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class StageEmbed(nn.Module):
    """Opens a stage: the previous map (or the image) cut into P x P patches, embedded and
    normalised; position embeddings added; the [class] token prepended in the last stage."""

    def __init__(self, c_in: int, dim: int, patch: int, side: int, cls: bool) -> None:
        super().__init__()
        self.proj = PatchEmbed(c_in, dim, patch)
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + cls, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D)."""
        x = self.norm(self.proj(x).flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


class PVTBlock(nn.Module):
    """x + SRA(LN(x)), x + MLP(LN(x)); a stage's first block embeds the previous stage's map."""

    def __init__(
        self, cfg: PVTConfig, stage: int, drop_path: float, embed: StageEmbed | None
    ) -> None:
        super().__init__()
        d = cfg.widths[stage]
        self.side, self.prev_side = cfg.side(stage), cfg.side(stage - 1) if stage else 0
        self.embed = embed
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = SRAttention(d, cfg.heads[stage], cfg.reductions[stage])
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_ratios[stage] * d)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None and self.prev_side:  # tokens of the previous stage -> map
            b, _, c = x.shape
            x = self.embed(x.transpose(1, 2).reshape(b, c, self.prev_side, self.prev_side))
        x = x + self.drop_path(self.attn(self.norm1(x), self.side))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PyramidVisionTransformer(Backbone):
    def __init__(self, cfg: PVTConfig) -> None:
        super().__init__(cfg.final_width)
        self.cfg = cfg
        last = len(cfg.depths) - 1
        blocks, self.stage_of = [], []
        c_in = cfg.channels
        for n, (i, _, _) in enumerate(cfg.blocks()):
            embed = None
            if not self.stage_of or self.stage_of[-1] != i:
                embed = StageEmbed(c_in, cfg.widths[i], cfg.patches[i], cfg.side(i), i == last)
                c_in = cfg.widths[i]
            rate = cfg.drop_path * n / max(cfg.depth - 1, 1)
            blocks.append(PVTBlock(cfg, i, rate, embed))
            self.stage_of.append(i)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.final_width, eps=1e-6)
        self.head = class_head(cfg.final_width, cfg.num_classes, cfg.head_bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the first stage's tokens (B, N, D)."""
        self.check_images(x)
        return self.blocks[0].embed(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The [class] token of the last stage's states; the average of an earlier stage's."""
        if tokens.shape[1] == self.cfg.final_side**2 + 1 and tokens.shape[2] == self.width:
            return tokens[:, 0]
        return tokens.mean(dim=1)

    def spatial(self, tokens: torch.Tensor) -> torch.Tensor:
        """A stage's tokens (B, h*w, C) (the last stage's after its [class] token) -> (B, C, h, w)."""
        n = tokens.shape[1]
        side = math.isqrt(n)
        if side * side != n:  # the last stage: a [class] token first
            tokens, side = tokens[:, 1:], math.isqrt(n - 1)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def resample_stage_pos_embeds(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each stage's position embeddings resampled to the model's grid (a resolution change)."""
    state = dict(state)
    for key, value in state.items():
        if key.endswith("embed.pos_embed") and key in own and value.shape != own[key].shape:
            cls = int(value.shape[1] ** 0.5) ** 2 != value.shape[1]
            side = round((own[key].shape[1] - cls) ** 0.5)
            state[key] = resample_pos_embed(value, (side, side), prefix_tokens=int(cls))
    return state
