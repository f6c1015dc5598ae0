"""ImageGPT, as in "Generative Pretraining from Pixels" (Chen et al., 2020).

Images arrive as palette token ids (B, H*W) in raster order (see `pipeline.data.palette`). A start
token is prepended; a decoder-only pre-norm transformer reads the sequence with causal attention
(autoregressive next-pixel objective) or bidirectional attention (BERT masked-pixel objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.errors import require
from pipeline.models.layers import (
    Backbone,
    Block,
    Embedding,
    Linear,
    TrainFlops,
    blocks_forward_flops,
    class_head,
)


@dataclass(frozen=True)
class IGPTConfig(TrainFlops):
    """Architecture of one ImageGPT; a registry name fills it, a run config may override fields."""

    family: ClassVar[str] = "igpt"

    name: str = "igpt"
    image_size: int = 32  # pixels per side; the sequence has image_size**2 tokens
    vocab_size: int = 512  # palette colours K (9 bits in the paper)
    width: int = 512
    depth: int = 24
    heads: int = 8
    mlp_dim: int = 2048
    causal: bool = True  # True: autoregressive (igpt-ar); False: BERT-style (igpt-bert)
    num_classes: int = 0  # classification head on pooled tokens, for finetuning
    head_bias: float = 0.0  # initial classifier bias (big_vision: -10 for sigmoid losses)
    drop_path: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("image_size", "vocab_size", "width", "depth", "heads", "mlp_dim"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        require(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be at least 2")
        require(
            self.width % self.heads == 0, "heads", self.heads, f"must divide width={self.width}"
        )
        require(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        require(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "must be in [0, 1)")

    @property
    def seq_len(self) -> int:
        """Pixels per image."""
        return self.image_size**2

    @property
    def num_tokens(self) -> int:
        """Sequence length the blocks see: pixels plus the start token."""
        return self.seq_len + 1

    @property
    def sos_id(self) -> int:
        return self.vocab_size

    @property
    def mask_id(self) -> int:
        return self.vocab_size + 1

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (embedding lookups are free)."""
        lm_head = 2 * self.num_tokens * self.width * self.vocab_size
        return blocks_forward_flops(self.num_tokens, self.width, self.depth, self.mlp_dim) + lm_head


class ImageGPT(Backbone):
    def __init__(self, cfg: IGPTConfig) -> None:
        super().__init__(cfg.width)
        self.cfg = cfg
        d = cfg.width
        self.tok_embed = Embedding(cfg.vocab_size + 2, d)  # palette + [start] + [mask]
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        nn.init.normal_(self.pos_embed, std=0.01)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        # GPT-2: residual projections scaled by 1/sqrt(2 depth) so the stream's variance stays put.
        out_std = 0.02 / math.sqrt(2 * cfg.depth)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.mlp_dim, causal=cfg.causal, drop_path=r, out_std=out_std)
            for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.lm_head = Linear(d, cfg.vocab_size, bias=False)
        self.head = class_head(d, cfg.num_classes, cfg.head_bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, H*W) or (B, H, W) -> states (B, 1 + H*W, D), start token first."""
        tokens = tokens.flatten(1)
        if tokens.shape[1] != self.cfg.seq_len or tokens.dtype.is_floating_point:
            raise ValueError(
                f"{self.cfg.name} expects integer token ids of shape (B, {self.cfg.seq_len}) or "
                f"(B, {self.cfg.image_size}, {self.cfg.image_size}); got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
        sos = tokens.new_full((tokens.shape[0], 1), self.cfg.sos_id)
        return self.tok_embed(torch.cat([sos, tokens], dim=1)) + self.pos_embed

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Average over the pixel positions (the start token is left out), as iGPT probes do."""
        return tokens[:, 1:].mean(dim=1)

    def spatial(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + H*W, D) -> the pixels' states as a map (B, D, H, W), in raster order."""
        side = self.cfg.image_size
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def forward(self, tokens: torch.Tensor, head: str = "lm") -> torch.Tensor:
        """Token ids (B, T) -> palette logits (B, T, K), where logits[:, i] predicts pixel i;
        head="classes": class logits (B, num_classes) from the average-pooled tokens (finetuning);
        head="both": (class logits, palette logits) from one pass.

        Causal: position i reads the start token and pixels < i. Bidirectional: position i reads
        every (possibly masked) pixel and predicts its own.
        """
        if head == "classes":
            return self.classify(tokens)
        if head not in ("lm", "both"):
            raise ValueError(f"ImageGPT heads are 'lm', 'classes' and 'both', not {head!r}")
        features = self.forward_features(tokens)
        logits = self.lm_head(features)
        logits = logits[:, :-1] if self.cfg.causal else logits[:, 1:]
        if head == "both":  # one pass for finetuning with the generative loss beside
            return self.forward_head(features), logits
        return logits

    @torch.no_grad()
    def sample(
        self, tokens: torch.Tensor, start: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) with pixels from `start` on sampled, one at a time, each from the
        palette distribution given the pixels before it (autoregressive models only).

        Every block keeps the keys and values of the positions it has seen (a cache): the
        known pixels go through the network once, then each new pixel alone, instead of the
        whole sequence once per pixel: hundreds of times fewer model FLOPs for a 32x32 image from
        its upper half; the same samples for the same generator (tested against `forward`)."""
        if not self.cfg.causal:
            raise ValueError(f"{self.cfg.name} is BERT-style: it fills masked pixels at once")
        out = tokens.flatten(1).clone()
        caches: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        sos = out.new_full((out.shape[0], 1), self.cfg.sos_id)
        x = self.tok_embed(torch.cat([sos, out[:, :start]], 1)) + self.pos_embed[:, : start + 1]
        for i in range(start, out.shape[1]):
            for block, cache in zip(self.blocks, caches, strict=True):
                x = block(x, cache)
            logits = self.lm_head(self.norm(x[:, -1]))  # at position i: predicts pixel i
            probs = logits.float().softmax(-1)
            out[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if i + 1 < out.shape[1]:  # pixel i enters at position i + 1
                x = self.tok_embed(out[:, i : i + 1]) + self.pos_embed[:, i + 1 : i + 2]
        return out
