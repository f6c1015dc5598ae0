"""Colour palettes that turn pixels into ImageGPT tokens and back.

ImageGPT clusters (R, G, B) pixel values with k-means into K = 512 colours (9 bits) and feeds each
pixel as the id of its nearest colour. `fit_palette` does that with mini-batch k-means over a
stream of pixel batches, so the data it learns from need not fit in memory. Two fixed palettes
need no fitting: `Palette.uniform` (3 bits per channel, 512 colours) and `Palette.grey` (levels
of one channel, for greyscale data such as Fashion-MNIST).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from pipeline.storage import filesystem

_CHUNK = 1 << 16  # pixels per distance computation; bounds memory at K * 64k floats


class Palette:
    """K colours of C channels, values in [0, 255]: `colours` (K, C) float32."""

    def __init__(self, colours: np.ndarray | torch.Tensor) -> None:
        colours = torch.as_tensor(np.asarray(colours, dtype=np.float32))
        if colours.ndim != 2 or colours.shape[0] < 2:
            raise ValueError(
                f"a palette needs a (K >= 2, C) colour array; got {tuple(colours.shape)}"
            )
        self.colours = colours

    @property
    def size(self) -> int:
        return self.colours.shape[0]

    @property
    def channels(self) -> int:
        return self.colours.shape[1]

    @classmethod
    def uniform(cls, bits: int = 3, channels: int = 3) -> Palette:
        """Every channel cut into 2**bits equal bins, colour = bin centre (2**(bits*C) colours)."""
        centres = (np.arange(2**bits) + 0.5) * (256 / 2**bits)
        grids = np.meshgrid(*([centres] * channels), indexing="ij")
        return cls(np.stack([g.ravel() for g in grids], axis=1))

    @classmethod
    def grey(cls, levels: int = 16) -> Palette:
        """`levels` evenly spaced grey values for one-channel images."""
        return cls(((np.arange(levels) + 0.5) * (256 / levels))[:, None])

    def _check(self, images: torch.Tensor) -> None:
        if images.shape[-1] != self.channels:
            raise ValueError(
                f"images have {images.shape[-1]} channels in their last axis; this palette has "
                f"{self.channels} (images are (..., H, W, C))"
            )

    def nearest(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, C) float -> index of the nearest colour (N,) int64, by squared distance."""
        c = self.colours
        c_sq = (c * c).sum(1)
        out = torch.empty(pixels.shape[0], dtype=torch.int64)
        for start in range(0, pixels.shape[0], _CHUNK):
            x = pixels[start : start + _CHUNK]
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every colour.
            out[start : start + _CHUNK] = (c_sq - 2.0 * x @ c.T).argmin(1)
        return out

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (..., H, W, C) -> token ids (..., H, W) int64."""
        if isinstance(images, torch.Tensor):
            images = images.float()
        else:  # np.array copies, so a read-only buffer (e.g. a decoded PIL image) is fine
            images = torch.from_numpy(np.array(images, dtype=np.float32))
        self._check(images)
        return self.nearest(images.reshape(-1, self.channels)).reshape(images.shape[:-1])

    def decode(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Token ids (..., H, W) -> uint8 images (..., H, W, C)."""
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.size):
            raise ValueError(
                f"token ids must lie in [0, {self.size}); got [{tokens.min()}, {tokens.max()}]"
            )
        return self.colours[tokens].round().clamp(0, 255).to(torch.uint8)

    def to_dict(self) -> dict:
        return {"format": "tessera-palette/1", "colours": self.colours.round(decimals=3).tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Palette:
        if data.get("format") != "tessera-palette/1":
            raise ValueError(f"not a Tessera palette (format {data.get('format')!r})")
        return cls(np.array(data["colours"], dtype=np.float32))

    def save(self, url: str, endpoint_url: str = "") -> None:
        fs, path = filesystem(url, endpoint_url)
        with fs.open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, url: str, endpoint_url: str = "") -> Palette:
        fs, path = filesystem(url, endpoint_url)
        with fs.open(path, "r") as f:
            return cls.from_dict(json.load(f))


def sample_pixels(
    images: Iterable[np.ndarray], per_image: int = 64, batch_pixels: int = 1 << 14, seed: int = 0
) -> Iterator[np.ndarray]:
    """Uint8 images (H, W, C) -> batches of `batch_pixels` randomly sampled pixels (n, C) float32."""
    rng = np.random.default_rng(seed)
    buf: list[np.ndarray] = []
    held = 0
    for image in images:
        pixels = np.asarray(image).reshape(-1, np.asarray(image).shape[-1])
        take = rng.choice(pixels.shape[0], size=min(per_image, pixels.shape[0]), replace=False)
        buf.append(pixels[take].astype(np.float32))
        held += len(take)
        if held >= batch_pixels:
            yield np.concatenate(buf)
            buf, held = [], 0
    if buf:
        yield np.concatenate(buf)


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    centres = [x[torch.randint(len(x), (1,), generator=gen)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centre = x[torch.multinomial(probs, 1, generator=gen)]
        centres.append(centre)
        d2 = torch.minimum(d2, ((x - centre) ** 2).sum(1))
    return torch.cat(centres)


def fit_palette(
    pixel_batches: Iterable[np.ndarray], k: int = 512, seed: int = 0, init_pixels: int | None = None
) -> Palette:
    """Mini-batch k-means (Sculley, 2010) over a stream of pixel batches (n, C), values 0-255.

    The first `init_pixels` pixels (default 4k) seed the centres with k-means++; every batch then
    moves each centre towards the mean of its assigned pixels with a step of (assigned / total
    assigned so far), the per-centre learning rate that makes each centre the running mean of all
    pixels it ever received. A centre that has received no pixel after a batch is moved onto a
    random pixel of that batch, so no colour stays dead.
    """
    gen = torch.Generator().manual_seed(seed)
    init_pixels = init_pixels or 4 * k
    batches = (torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in pixel_batches)
    seen: list[torch.Tensor] = []
    for batch in batches:
        seen.append(batch)
        if sum(len(b) for b in seen) >= init_pixels:
            break
    if not seen:
        raise ValueError("fit_palette got no pixels")
    first = torch.cat(seen)
    if len(first) < k:
        raise ValueError(
            f"fit_palette needs at least k={k} pixels to seed; the stream had {len(first)}"
        )
    palette = Palette(_kmeans_plus_plus(first, k, gen))
    counts = torch.zeros(k)

    def update(x: torch.Tensor) -> None:
        assign = palette.nearest(x)
        n = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(palette.colours).index_add_(0, assign, x)
        counts.add_(n)
        hit = n > 0
        step = (n[hit] / counts[hit])[:, None]
        palette.colours[hit] += step * (sums[hit] / n[hit, None] - palette.colours[hit])
        dead = (counts == 0).nonzero().flatten()
        if len(dead):
            palette.colours[dead] = x[torch.randint(len(x), (len(dead),), generator=gen)]

    update(first)
    for batch in batches:
        update(batch)
    return palette
