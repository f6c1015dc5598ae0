"""DeiT's per-sample augmentations on uint8 pixels: RandAugment and random erasing.

Both draw from the sample's own `random.Random` (seeded by the stream from seed, epoch and
sample), after its crop and flip, so a resumed run or another rank draws the same.

RandAugment (Cubuk et al. 2020), as timm's "rand-mM-nN": N operations picked uniformly from
fifteen, each applied with probability 0.5 at magnitude M of 10 (signed operations flip their
sign with probability 0.5). Random erasing (Zhong et al. 2020, timm's "pixel" mode): with
probability p, a rectangle of 2-33% of the image, aspect 0.3-3.3, filled with random pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    fill = (128,) * len(img.getbands())
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                         fillcolor=fill)  # fmt: skip


def _rotate(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    fill = (128,) * len(img.getbands())
    angle = _signed(30.0 * m, rng)
    return img.rotate(angle, Image.Resampling.BILINEAR, fillcolor=fill)


def _shear_x(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, _signed(0.3 * m, rng), 0, 0, 1, 0))


def _shear_y(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, _signed(0.3 * m, rng), 1, 0))


def _translate_x(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, _signed(0.45 * m, rng) * img.size[0], 0, 1, 0))


def _translate_y(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m, rng) * img.size[1]))


def _enhance(kind: type) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    def op(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
        return kind(img).enhance(1.0 + _signed(0.9 * m, rng))

    return op


def _posterize(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, 4 - int(4 * m))


def _solarize(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, 256 - int(256 * m))


def _solarize_add(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    a = np.asarray(img).astype(np.int16)
    added = np.where(a < 128, np.minimum(a + int(110 * m), 255), a)
    return Image.fromarray(added.astype(np.uint8))


OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "auto_contrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "invert": lambda img, m, rng: ImageOps.invert(img),
    "rotate": _rotate,
    "posterize": _posterize,
    "solarize": _solarize,
    "solarize_add": _solarize_add,
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
NAMES = sorted(OPS)


def rand_augment(pixels: torch.Tensor, ops: int, magnitude: float, rng: random.Random) -> None:
    """`ops` random operations at `magnitude` (of 10) on uint8 pixels (C, H, W), in place."""
    chosen = [rng.choice(NAMES) for _ in range(ops)]
    applied = [name for name in chosen if rng.random() < 0.5]
    if not applied:
        return
    array = pixels.permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    for name in applied:
        img = OPS[name](img, magnitude / MAX_LEVEL, rng)
    out = np.asarray(img)
    pixels.copy_(torch.from_numpy(out.reshape(array.shape).copy()).permute(2, 0, 1))


def random_erase(pixels: torch.Tensor, probability: float, rng: random.Random) -> None:
    """With `probability`, a random rectangle of uint8 pixels (C, H, W) replaced by random
    values, in place (timm's RandomErasing, mode "pixel", one rectangle)."""
    if probability <= 0 or rng.random() >= probability:
        return
    c, h, w = pixels.shape
    for _ in range(10):
        area = h * w * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            noise = np.random.default_rng(rng.getrandbits(64)).integers(
                0, 256, (c, eh, ew), dtype=np.uint8
            )
            pixels[:, top : top + eh, left : left + ew] = torch.from_numpy(noise)
            return
