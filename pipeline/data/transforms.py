"""Per-sample transforms: decode, geometric augmentation, then pixels or palette tokens.

Randomness comes from a `random.Random` seeded per sample by the stream from (seed, epoch,
sample), so an augmentation does not depend on which rank or worker reads the sample.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.palette import Palette


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """Inception-style crop (as ViT and torchvision use): area fraction in `scale`, aspect ratio
    log-uniform in `ratio`; after 10 failed draws, the largest centred crop within `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image bytes -> float pixels (C, H, W) in [-1, 1], or token ids (H*W,) int64."""

    size: int  # output side in pixels
    channels: int  # 1 (grey) or 3 (RGB); images are converted
    augment: bool  # random resized crop + horizontal flip; otherwise centre square, resized
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    palette: Palette | None = None  # set: output palette tokens (ImageGPT)

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            mode = "L" if self.channels == 1 else "RGB"
            im = im.convert(mode) if im.mode != mode else im
            w, h = im.size
            if self.augment:
                box = random_resized_crop_box(w, h, self.crop_scale, rng)
            else:
                box = center_square_box(w, h)
            # Area averaging when shrinking for tokens (as iGPT's downsampling), bilinear otherwise.
            resample = Image.BOX if self.palette is not None else Image.BILINEAR
            if box != (0, 0, w, h) or (w, h) != (self.size, self.size):
                im = im.resize((self.size, self.size), resample, box=box)
            if self.augment and self.hflip and rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(im)
        if self.palette is not None:
            return self.palette.encode(pixels.reshape(self.size, self.size, -1)).numpy().reshape(-1)
        x = pixels.astype(np.float32) * (2.0 / 255.0) - 1.0
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
