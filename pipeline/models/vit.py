"""Vision Transformer, as in "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021).

Image (B, C, H, W) -> P x P patches, linearly embedded -> [class] token prepended -> learnable 1D
position embeddings added -> pre-norm blocks -> final LayerNorm -> head on the [class] token, or
on the average of the patch tokens (`pool="avg"`, then with its own LayerNorm, as timm does).

DeiT (Touvron et al., 2021) adds a distillation token (`distilled: true`): a second learned
token beside [class], with its own position embedding and its own head, which training fits to
a teacher's predictions; at inference the two heads' logits are averaged.

The paper's hybrid (its section 3.1) cuts the patches from a CNN's feature map instead of the
image: `stem=(32, 64, 128)` puts three 3x3 stride-2 convolutions before the patch embedding, and
`patch_size` then counts feature-map pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from pipeline.errors import require
from pipeline.models.layers import (
    Backbone,
    Block,
    PatchEmbed,
    TrainFlops,
    blocks_forward_flops,
    class_head,
)


@dataclass(frozen=True)
class ViTConfig(TrainFlops):
    """Architecture of one ViT; a registry name fills it, a run config may override fields."""

    family: ClassVar[str] = "vit"

    name: str = "vit"
    image_size: int = 224  # pixels per side (square images)
    patch_size: int = 16  # pixels per patch side (of the stem's feature map, with a stem)
    stem: tuple[int, ...] = ()  # hybrid: channels of the stem's convolutions; () for none
    channels: int = 3
    width: int = 768  # hidden size D
    depth: int = 12  # number of blocks L
    heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000  # 0: no head, forward returns pooled features
    pool: Literal["cls", "avg"] = "cls"
    distilled: bool = False  # DeiT: a distillation token and head beside [class]
    head_bias: float = 0.0  # initial classifier bias (big_vision: -10 for sigmoid losses)
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear from 0)
    grad_checkpointing: bool = False  # recompute block activations in backward

    def __post_init__(self) -> None:
        object.__setattr__(self, "stem", tuple(self.stem))  # a list from YAML or model.json
        for key in ("image_size", "patch_size", "channels", "width", "depth", "heads", "mlp_dim"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        require(all(c > 0 for c in self.stem), "stem", list(self.stem), "channels must be positive")
        if self.stem:
            require(
                self.feature_size % self.patch_size == 0,
                "patch_size",
                self.patch_size,
                f"must divide the stem's {self.feature_size}x{self.feature_size} feature map "
                f"(image_size {self.image_size} halved {len(self.stem)} times, rounded up)",
            )
        else:
            require(
                self.image_size % self.patch_size == 0,
                "image_size",
                self.image_size,
                f"must be a multiple of patch_size={self.patch_size}",
            )
        require(
            self.width % self.heads == 0,
            "heads",
            self.heads,
            f"must divide width={self.width}",
        )
        require(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        require(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "must be in [0, 1)")
        require(
            not (self.distilled and self.pool != "cls"), "pool", self.pool,
            "must be cls for a distilled ViT (its two heads read the two tokens)",
        )  # fmt: skip

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: [class], and DeiT's distillation token."""
        return 1 + self.distilled

    @property
    def stem_maps(self) -> list[tuple[int, int]]:
        """(channels, side) of each stem convolution's output: each halves the side, rounding up."""
        maps, side = [], self.image_size
        for c in self.stem:
            side = (side + 1) // 2
            maps.append((c, side))
        return maps

    @property
    def feature_size(self) -> int:
        """Side of what the patches are cut from: the image, or the stem's last feature map."""
        return self.stem_maps[-1][1] if self.stem else self.image_size

    @property
    def token_pixels(self) -> int:
        """Image pixels a token spans per side: the patch, times 2 per stem convolution."""
        return self.patch_size * 2 ** len(self.stem)

    @property
    def grid(self) -> int:
        return self.feature_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length: patches plus the [class] (and distillation) token."""
        return self.grid**2 + self.prefix_tokens

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image."""
        stem, c_in = 0, self.channels
        for c, side in self.stem_maps:
            stem += 2 * side**2 * 9 * c_in * c
            c_in = c
        patches = self.grid**2
        embed = 2 * patches * self.patch_size**2 * c_in * self.width
        head = 2 * self.width * self.num_classes * self.prefix_tokens
        return (
            stem
            + embed
            + blocks_forward_flops(self.num_tokens, self.width, self.depth, self.mlp_dim)
            + head
        )


class ConvStem(nn.Sequential):
    """The hybrid ViT's CNN, small: per entry of `channels`, a 3x3 stride-2 convolution,
    GroupNorm over all its channels and ReLU. GroupNorm, not BatchNorm: no running statistics to
    keep in step across data-parallel ranks, and the same numbers in training and evaluation.
    No channels: the identity, and no parameters (the plain ViT)."""

    def __init__(self, channels_in: int, channels: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for c in channels:
            conv = nn.Conv2d(channels_in, c, 3, stride=2, padding=1, bias=False)
            layers += [conv, nn.GroupNorm(1, c, eps=1e-6), nn.ReLU()]
            channels_in = c
        super().__init__(*layers)


class VisionTransformer(Backbone):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg.width)
        self.cfg = cfg
        d = cfg.width
        self.stem = ConvStem(cfg.channels, cfg.stem)
        self.patch_embed = PatchEmbed(cfg.stem[-1] if cfg.stem else cfg.channels, d, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02, a=-0.04, b=0.04)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_dim, drop_path=r) for r in rates)
        # timm's layout: LayerNorm on the tokens for [class] pooling, after pooling for "avg".
        self.norm = nn.LayerNorm(d, eps=1e-6) if cfg.pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if cfg.pool == "avg" else nn.Identity()
        # Zero head, as the ViT paper; a negative bias for sigmoid losses, as big_vision.
        self.head = class_head(d, cfg.num_classes, cfg.head_bias)
        self.head_dist: nn.Module | None = (
            class_head(d, cfg.num_classes, cfg.head_bias) if cfg.distilled and cfg.num_classes
            else None
        )  # fmt: skip
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + H*W/P^2, D)."""
        self.check_images(x)
        b = x.shape[0]
        patches = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        return torch.cat([*prefix, patches], dim=1) + self.pos_embed

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the [class] token (averaged with the distillation token in
        DeiT, as timm's pre-logits), or the patch tokens' average."""
        if self.cfg.pool == "cls":
            return tokens[:, 0] if not self.cfg.distilled else (tokens[:, 0] + tokens[:, 1]) / 2
        return self.fc_norm(tokens[:, self.cfg.prefix_tokens :].mean(dim=1))

    def spatial(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + h*w, D) -> the patch tokens as a map (B, D, h, w)."""
        patches = tokens[:, self.cfg.prefix_tokens :]
        side = math.isqrt(patches.shape[1])
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_dist is None or pre_logits:
            return super().forward_head(features, pre_logits)
        return (self.head(features[:, 0]) + self.head_dist(features[:, 1])) / 2

    def reset_head(self, num_classes: int, bias: float = 0.0) -> None:
        super().reset_head(num_classes, bias)
        if self.cfg.distilled:
            param = next(self.parameters())
            self.head_dist = (
                class_head(self.width, num_classes, bias).to(param.device, param.dtype)
                if num_classes else None
            )  # fmt: skip

    def forward(
        self, x: torch.Tensor, head: str = "classes"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> logits (B, num_classes) (DeiT: the two heads averaged), or
        pooled (B, D) with no head. head="both" (DeiT's training): the [class] head's logits
        and the distillation head's, apart."""
        if head == "both" and self.head_dist is not None:
            tokens = self.forward_features(x)
            return self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])
        if head != "classes":
            raise ValueError(f"{self.cfg.name} has no {head!r} head (a distilled ViT has 'both')")
        return self.classify(x)
