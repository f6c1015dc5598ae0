"""Transformer building blocks shared by ViT and ImageGPT.

Single-device code: nothing here knows about DeepSpeed or Ray. Activation checkpointing is a
switch on the backbone (`set_grad_checkpointing`), applied per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _trunc_normal(t: torch.Tensor, std: float) -> None:
    if std == 0:
        nn.init.zeros_(t)
    else:
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


# Layers initialise themselves in their own constructors (`reset_parameters`), not in a pass
# over the finished model: DeepSpeed's ZeRO-3 `zero.Init` shards each layer's parameters as soon
# as the layer is built, and a later init pass would silently touch nothing.


class Linear(nn.Linear):
    """nn.Linear with truncated-normal weights (std, 0 for zeros) and a constant bias."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        bias: bool = True,
        std: float = 0.02,
        bias_init: float = 0.0,
    ) -> None:
        self.init_std, self.bias_init = std, bias_init
        super().__init__(fan_in, fan_out, bias)

    def reset_parameters(self) -> None:
        _trunc_normal(self.weight, self.init_std)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_init)


class PatchEmbed(nn.Conv2d):
    """P x P patches -> D, a strided convolution; LeCun normal (std 1/sqrt(P*P*C)) as in
    big_vision's ViT, so patch tokens start at unit scale."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__(channels, dim, patch, stride=patch)

    def reset_parameters(self) -> None:
        _trunc_normal(self.weight, self.weight[0].numel() ** -0.5)
        nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with normal(0, std) rows (GPT-2's token embedding)."""

    def __init__(self, num: int, dim: int, std: float = 0.02) -> None:
        self.init_std = std
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)


def uses_fused_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention runs PyTorch's fused kernel (no s x s matrices kept) or the explicit
    softmax(QK^T)V. Fused everywhere but CPU in bf16, where its backward is slow: 1.35x-4.8x the
    explicit product's time at 50-197 tokens (benchmarks/train_step.py, "attention" rows)."""
    return not (device.type == "cpu" and dtype == torch.bfloat16)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; x: (B, N, D) -> (B, N, D).
    `out_std`: init of the output projection (GPT-2 scales it down with depth)."""

    def __init__(self, dim: int, heads: int, causal: bool = False, out_std: float = 0.02) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim, std=out_std)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, N, D/H)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`cache` (sampling): a list, empty at first, that keeps this layer's keys and values
        ([k, v], each (B, H, N, D/H)); x then holds only the tokens after the cached ones, all
        at once when the cache is empty, one at a time after."""
        q, k, v = self._qkv(x)
        causal = self.causal
        if cache is not None:
            if cache:
                if x.shape[1] != 1:
                    raise ValueError("after the first call, a cached attention takes one token")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = False  # the one new token reads every earlier one, and itself
            cache[:] = [k, v]
        if uses_fused_attention(x.device, x.dtype):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = self._probs(q, k, causal) @ v
        return self.proj(out.transpose(1, 2).flatten(2))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, H, N, N), computed explicitly; for maps, not training."""
        q, k, _ = self._qkv(x)
        return self._probs(q, k, self.causal)

    def _probs(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if causal:
            n = q.shape[-2]
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_std: float = 0.02) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        causal: bool = False,
        drop_path: float = 0.0,
        out_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, causal=causal, out_std=out_std)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, out_std=out_std)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), cache))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """What every family shares: a stack of blocks, per-block checkpointing, the head API.

    Subclasses define `embed(x)`, the first block's input (tokens (B, N, D) for transformers,
    feature maps (B, C, H, W) for CNNs), `pool(states) -> (B, D)`, `blocks`, `norm` (the final
    norm on the states, Identity where pooling normalises) and `head`. Hierarchical models
    group their blocks into stages for layer-wise lr decay (`decay_depth`, `decay_layer`).
    """

    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        # Hierarchical models: the stage of each block (layer-wise lr decay goes by stage).
        self.stage_of: list[int] | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spatial(self, states: torch.Tensor) -> torch.Tensor:
        """A block's output as a feature map (B, C, h, w), for probes that pool it on a grid."""
        raise NotImplementedError(f"{type(self).__name__} has no spatial map of its states")

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def decay_depth(self) -> int:
        """Layers that layer-wise lr decay counts between the embedding and the head."""
        return self.depth if self.stage_of is None else self.stage_of[-1] + 1

    def decay_layer(self, block: int) -> int:
        """Layer (1..decay_depth) of a block for layer-wise lr decay: its own in a flat stack,
        its stage's in a hierarchical model."""
        return block + 1 if self.stage_of is None else self.stage_of[block] + 1

    def running_stats(self) -> list[torch.Tensor]:
        """Statistics a model keeps outside its parameters (BatchNorm's), which each rank
        updates on its own batches; none in a transformer."""
        return []

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Block indices, negative ones counted from the end; out of range is an error."""
        resolved = []
        for i in layers:
            j = i + self.depth if i < 0 else i
            if not 0 <= j < self.depth:
                raise IndexError(
                    f"layer {i} is out of range for a model with {self.depth} blocks "
                    f"(allowed: 0..{self.depth - 1} or -{self.depth}..-1)"
                )
            resolved.append(j)
        return resolved

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                block, x, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self.recomputing(block)),
            )  # fmt: skip
        return block(x)

    def recomputing(self, block: nn.Module) -> contextlib.AbstractContextManager:
        """The context in which checkpointing recomputes `block` in backward (a ResNet's
        BatchNorms leave their running statistics alone there); none by default."""
        return contextlib.nullcontext()

    def check_images(self, x: torch.Tensor) -> None:
        """Images (B, C, H, W) of the configured channels and size, or an error saying both."""
        cfg = self.cfg
        if tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"{cfg.name} expects images of shape (B, {cfg.channels}, {cfg.image_size}, "
                f"{cfg.image_size}); got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, head: str = "classes") -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes), or pooled (B, D) with no head."""
        if head != "classes":
            raise ValueError(f"{self.cfg.name} has only a class head, not {head!r}")
        return self.classify(x)

    def forward_features(
        self, x: torch.Tensor, layers: Sequence[int] | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Token states (B, N, D), or feature maps (B, C, H, W) for a CNN.

        layers=None: the final, normalised states.
        layers=[i, ...]: the raw outputs of those blocks, in the order asked, as a list;
        blocks after the deepest one asked for are not computed.
        """
        wanted = None if layers is None else self.resolve_layers(layers)
        x = self.embed(x)
        last = self.depth - 1 if wanted is None else max(wanted)
        states: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: last + 1]):
            x = self._run_block(block, x)
            if wanted is not None and i in wanted:
                states[i] = x
        if wanted is None:
            return self.norm(x)
        return [states[i] for i in wanted]

    def features(
        self, x: torch.Tensor, layers: Sequence[int], grids: Sequence[int] = (0,)
    ) -> list[torch.Tensor]:
        """Pooled representations of the given blocks, as linear probes read them, for each
        block each pooling in `grids` in turn: 0 the model's own ([class] token or average over
        tokens, (B, D)); k > 0 the block's spatial map averaged over a k x k grid, (B, D k^2) (the
        protocol of linear probes on convolutional features, Zhang et al. 2016, Goyal et al.
        2019, which keeps where in the image a feature fired). The last block's output is
        normalised first, as the head sees it."""
        wanted = self.resolve_layers(layers)
        states = self.forward_features(x, layers=wanted)
        last, out = self.depth - 1, []
        for i, s in zip(wanted, states, strict=True):
            s = self.norm(s) if i == last else s
            for k in grids:
                out.append(self.pool(s) if k == 0 else grid_pool(self.spatial(s), k, i))
        return out

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) from the pooled final tokens."""
        return self.forward_head(self.forward_features(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """States (tokens or maps) -> pooled (B, D) if pre_logits, else logits (B, classes)."""
        pooled = self.pool(features)
        return pooled if pre_logits else self.head(pooled)

    def reset_head(self, num_classes: int, bias: float = 0.0) -> None:
        """Replace the classifier: zero weights and a constant bias (ViT finetuning, big_vision
        uses a negative bias for sigmoid losses); num_classes=0 makes it the identity."""
        param = next(self.parameters())
        self.head = class_head(self.width, num_classes, bias).to(param.device, param.dtype)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block, each (B, H, N, N), in eval mode."""
        maps = []
        h = self.embed(x)
        for block in self.blocks:
            maps.append(block.attn.weights(block.norm1(h)))
            h = block(h)
        return maps


def grid_pool(maps: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Maps (B, C, h, w) of `block` -> their averages over a k x k grid, (B, C k^2),
    channel-major."""
    h, w = maps.shape[-2:]
    if min(h, w) < k:
        raise ValueError(
            f"eval.grids: a {k}x{k} grid needs at least {k}x{k} positions, and block {block}'s "
            f"map has {h}x{w}"
        )
    return torch.nn.functional.adaptive_avg_pool2d(maps.float(), k).flatten(1)


def class_head(width: int, num_classes: int, bias: float = 0.0) -> nn.Module:
    """A zero-initialised classifier with a constant bias (the ViT paper; big_vision's negative
    bias for sigmoid losses), or the identity for num_classes=0 (pooled features out)."""
    if num_classes == 0:
        return nn.Identity()
    return Linear(width, num_classes, std=0.0, bias_init=bias)


class TrainFlops:
    """Mixin for architecture configs that define forward_flops()."""

    def forward_flops(self) -> int:
        raise NotImplementedError

    def train_flops(self) -> int:
        """Model FLOPs of one training step per sample: forward + backward (2x forward)."""
        return 3 * self.forward_flops()


def blocks_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
    """Forward FLOPs of `depth` blocks over `tokens` tokens, per sample (2 FLOPs per MAC).

    Per block: qkv (3ND^2), scores QK^T (N^2 D), weighted sum AV (N^2 D), output projection
    (ND^2), MLP (2NDM). Causal attention is counted in full, as is the convention for MFU.
    """
    n, d = tokens, width
    macs = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * mlp_dim
    return 2 * depth * macs
