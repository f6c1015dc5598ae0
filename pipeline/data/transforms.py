"""Per-sample transforms: decode, geometric augmentation, then pixels or palette tokens.

Pixels leave the loader as uint8 (C, H, W): a quarter of the bytes of float32 between worker
processes, and the conversion to floats in [-1, 1] (`model_input`) runs where the model is, on
the accelerator. Cropping and resizing use torch's vectorised uint8 antialiased bilinear kernel
(profiling showed PIL's resize costing more than the JPEG decode), and a JPEG whose crop is at
least twice the output size is decoded at a reduced DCT scale to begin with.

Randomness comes from a `random.Random` seeded per sample by the stream from (seed, epoch,
sample), so an augmentation does not depend on which rank or worker reads the sample.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.palette import Palette


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (as big_vision's value_range(-1, 1)); floats pass."""
    if images.dtype == torch.uint8:
        return images.float().mul_(2.0 / 255.0).sub_(1.0)
    return images


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop (as ViT and torchvision use): area fraction in `scale`, aspect ratio
    log-uniform in `ratio`; after 10 failed draws, the largest centred crop within `ratio`.
    Returns an integer box (left, top, right, bottom)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _decode(
    im: Image.Image, mode: str, box: tuple[int, int, int, int], size: int
) -> tuple[np.ndarray, tuple]:
    """Decode, at a reduced JPEG scale when the crop is >= 2x the output; the box follows."""
    left, top, right, bottom = box
    reduce = min(right - left, bottom - top) // size
    if im.format == "JPEG" and reduce >= 2:
        scale = min(8, 1 << (reduce.bit_length() - 1))
        w, h = im.size
        im.draft(mode, (math.ceil(w / scale), math.ceil(h / scale)))
        sx, sy = im.size[0] / w, im.size[1] / h
        box = (
            int(left * sx),
            int(top * sy),
            max(int(left * sx) + 1, round(right * sx)),
            max(int(top * sy) + 1, round(bottom * sy)),
        )
    im = im.convert(mode) if im.mode != mode else im
    return np.asarray(im), box


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image bytes -> uint8 pixels (C, H, W), or palette token ids (H*W,) int64."""

    size: int  # output side in pixels
    channels: int  # 1 (grey) or 3 (RGB); images are converted
    augment: bool  # random resized crop + horizontal flip; otherwise centre square, resized
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    palette: Palette | None = None  # set: output palette tokens (ImageGPT)

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            box = (
                random_resized_crop_box(w, h, self.crop_scale, rng)
                if self.augment
                else center_square_box(w, h)
            )
            pixels, (left, top, right, bottom) = _decode(im, mode, box, self.size)
        crop = np.array(
            pixels[top:bottom, left:right]
        )  # a copy of the crop: PIL's buffer is read-only
        x = torch.from_numpy(crop.reshape(bottom - top, right - left, -1))
        x = x.permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last in memory
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.augment and self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        if self.palette is not None:
            return self.palette.encode(x[0].permute(1, 2, 0)).numpy().reshape(-1)
        return np.ascontiguousarray(x[0].numpy())
