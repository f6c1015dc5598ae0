"""Per-sample transforms: decode, geometric augmentation, then pixels or palette tokens.

Pixels leave the loader as uint8 (C, H, W): a quarter of the bytes of float32 between worker
processes, and the conversion to floats in [-1, 1] (`model_input`) runs where the model is, on
the accelerator. A JPEG is decoded only as far as its crop needs (`jpeg.decode_crop`,
libjpeg-turbo; other formats, or without the built decoder, PIL decodes all and crops), and at a
reduced DCT scale when the crop is at least twice the output size. Resizing uses torch's
vectorised uint8 antialiased bilinear kernel (profiling showed PIL's resize costing more than
the JPEG decode). Both decoders give the same pixels (tests/test_transforms.py).

Raw pixels (`tessera prepare --pixels raw`, for images of one size) skip the decoder. A batch
of small ones is cropped, resized and flipped together (`raw_into`): the same antialiased
bilinear filter, written as two per-sample weight matrices and applied with two batched matrix
products. Per sample, a 28 px image spent 25 us in one call of the resize kernel and 40 us in
PIL; a whole batch of 256 now takes about as long as one such call. Larger raw images (a 256 px
colour image is 192 KB, a JPEG of it a few to tens of KB) are cropped and resized one at a time,
as decoded crops are: where storage holds them, the decode is gone.

Randomness comes from a `random.Random` seeded per sample by the stream from (seed, epoch,
sample), so an augmentation does not depend on which rank or worker reads the sample.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data import jpeg
from pipeline.data.augment import rand_augment, random_erase
from pipeline.data.palette import Palette

Box = tuple[int, int, int, int]  # a crop: left, top, right, bottom


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
) -> Box:
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


def center_square_box(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _reduction(box: Box, size: int) -> int:
    """The JPEG DCT scale 1/n (n = 1, 2, 4 or 8) to decode at: the largest that keeps the crop
    at least `size` on its short side."""
    left, top, right, bottom = box
    reduce = min(right - left, bottom - top) // size
    return min(8, 1 << (reduce.bit_length() - 1)) if reduce >= 2 else 1


def _scale_box(box: Box, size: tuple[int, int], scaled: tuple[int, int]) -> Box:
    """A box on the full image -> the same box on the image decoded at a reduced scale."""
    left, top, right, bottom = box
    sx, sy = scaled[0] / size[0], scaled[1] / size[1]
    return (
        int(left * sx),
        int(top * sy),
        max(int(left * sx) + 1, round(right * sx)),
        max(int(top * sy) + 1, round(bottom * sy)),
    )


def _decode_pil(data: bytes, mode: str, box_of: Callable[[int, int], Box], size: int) -> np.ndarray:
    """PIL: decode (at a reduced JPEG scale when the crop allows), crop; (h, w, C) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        box = box_of(w, h)
        scale = _reduction(box, size) if im.format == "JPEG" else 1
        if scale > 1:  # PIL's draft takes the scale that divides the size into the one asked
            im.draft(mode, (w // scale, h // scale))
            box = _scale_box(box, (w, h), im.size)
        im = im.convert(mode) if im.mode != mode else im
        left, top, right, bottom = box
        crop = np.array(np.asarray(im)[top:bottom, left:right])  # a copy: PIL's is read-only
        return crop.reshape(bottom - top, right - left, -1)


def _decode_jpeg(
    data: bytes, channels: int, draw: Callable[[int, int], tuple[Box, bool]], size: int
) -> tuple[np.ndarray | None, tuple[Box, bool] | None]:
    """libjpeg-turbo: decode only the crop, flipped as drawn. (crop or None, what was drawn if
    it was: the box and the flip): None when libjpeg refuses the data or PIL must convert the
    colours (grey from colour, CMYK)."""
    try:
        w, h, components = jpeg.info(data)
    except jpeg.JpegError:
        return None, None
    drawn = box, flip = draw(w, h)
    if not (components == channels or (channels == 3 and components == 1)):
        return None, drawn
    scale = _reduction(box, size)
    scaled = jpeg.scaled_size(w, h, scale)
    try:
        box = _scale_box(box, (w, h), scaled)
        return jpeg.decode_crop(data, box, channels, scale, (w, h), flip=flip), drawn
    except jpeg.JpegError:
        return None, drawn


def resize_weights(start: np.ndarray, length: np.ndarray, full: int, size: int) -> np.ndarray:
    """Antialiased bilinear (triangle filter) weights (n, size, full) float32 that map each
    sample's span [start, start + length) of a `full`-pixel axis onto `size` output pixels.

    The filter of PIL's and torch's antialiased bilinear resize: output pixel i centred at
    start + (i + 0.5) * scale, scale = length / size; the triangle widened by the scale when
    shrinking; inputs outside the span get no weight; each row sums to 1."""
    start, length = start.astype(np.float32), length.astype(np.float32)
    scale = (length / size)[:, None, None]
    centre = start[:, None, None] + (np.arange(size, dtype=np.float32)[:, None] + 0.5) * scale
    x = np.arange(full, dtype=np.float32) + 0.5
    w = np.subtract(x, centre)  # (n, size, full)
    np.abs(w, out=w)
    w /= -np.maximum(scale, 1.0)
    w += 1.0
    np.maximum(w, 0.0, out=w)
    w *= (x > start[:, None, None]) & (x < (start + length)[:, None, None])
    w /= w.sum(-1, keepdims=True)
    return w


def grey(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) -> luminance (..., 1), with PIL's integer formula for mode "L"."""
    p = pixels.astype(np.uint32)
    y = (p[..., 0] * 19595 + p[..., 1] * 38470 + p[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)[..., None]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor allocated by numpy, which asks the kernel for huge pages for
    large arrays (profiled: a 10 MB batch took 2,300 page faults from torch.empty, none here)."""
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


SMALL = 96 * 96  # pixels: an image this small is resized in a batch (`raw_into`) by the stream


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image bytes -> uint8 pixels (C, H, W), or palette token ids (H*W,) int64."""

    size: int  # output side in pixels
    channels: int  # 1 (grey) or 3 (RGB); images are converted
    augment: bool  # random resized crop + horizontal flip; otherwise centre square, resized
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    palette: Palette | None = None  # set: output palette tokens (ImageGPT)
    fast_jpeg: bool = True  # decode JPEG crops with libjpeg-turbo (jpeg.py) when it is built
    # DeiT's recipe, after the crop and flip, with augment (augment.py): RandAugment's number
    # of operations (0: off) and magnitude of 10, and random erasing's probability
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    erasing: float = 0.0

    def finish(self, pixels: torch.Tensor, rng: random.Random) -> None:
        """RandAugment, then random erasing, on one sample's uint8 pixels (C, H, W), in place."""
        if not self.augment or self.palette is not None:
            return
        if self.randaugment_ops:
            rand_augment(pixels, self.randaugment_ops, self.randaugment_magnitude, rng)
        random_erase(pixels, self.erasing, rng)

    @property
    def layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        """One sample's shape in memory and its dtype: pixels (H, W, C) uint8, channels last as
        decoded, which the resize writes straight into; or tokens (H*W,) int64."""
        if self.palette is not None:
            return (self.size * self.size,), torch.int64
        return (self.size, self.size, self.channels), torch.uint8

    def batch(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, *layout) memory -> the batch the model takes: pixels (B, C, H, W) (channels last
        in memory), or tokens (B, H*W)."""
        return memory if self.palette is not None else memory.permute(0, 3, 1, 2)

    def crop_box(self, w: int, h: int, rng: random.Random) -> Box:
        if self.augment:
            return random_resized_crop_box(w, h, self.crop_scale, rng)
        return center_square_box(w, h)

    def draw(self, w: int, h: int, rng: random.Random) -> tuple[Box, bool]:
        """A sample's crop box, then whether it is flipped, drawn from its rng in this order on
        every path (`raw_into`'s batches too)."""
        box = self.crop_box(w, h, rng)
        return box, self.augment and self.hflip and rng.random() < 0.5

    def __call__(self, data: bytes | np.ndarray, rng: random.Random) -> np.ndarray:
        """One sample in a fresh contiguous array: pixels (C, H, W) or tokens (H*W,)."""
        out = self.batch(empty((1, *self.layout[0]), self.layout[1]))[0]
        return np.ascontiguousarray(self.into(data, rng, out).numpy())

    def small(self, data: bytes) -> np.ndarray | None:
        """A small encoded image (at most SMALL pixels, not a JPEG the crop decoder takes)
        decoded whole to pixels (h, w, C), for `raw_into`; None for any other image."""
        if self.fast_jpeg and jpeg.is_jpeg(data) and jpeg.available():
            return None
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > SMALL:
                return None
            mode = "L" if self.channels == 1 else "RGB"
            pixels = np.asarray(im.convert(mode) if im.mode != mode else im)
        return pixels.reshape(*pixels.shape[:2], self.channels)

    def raw_into(
        self, images: np.ndarray, rngs: list[random.Random], out: torch.Tensor
    ) -> torch.Tensor:
        """Raw pixels (n, h, w, C) uint8 -> `out` (n rows of `batch(...)`), all at once: each
        sample's crop box and flip drawn from its own rng as `into` draws them, then one
        resize of the whole batch. Images above SMALL pixels are cropped and resized one at a
        time by torch's kernel, as decoded crops are (as matrices, a 256 px image's resize
        would take 165 MFLOP). Returns `out`."""
        n, h, w, c = images.shape
        if c != self.channels:
            images = grey(images) if self.channels == 1 else np.repeat(images, 3, axis=-1)
        if h * w > SMALL:
            for image, rng, row in zip(images, rngs, out, strict=True):
                (left, top, right, bottom), flip = self.draw(w, h, rng)
                crop = image[top:bottom, left:right]  # a view; torch reads its strides
                self._resize_into(crop if crop.flags.writeable else crop.copy(), flip, rng, row)
            return out
        boxes = np.array([self.crop_box(w, h, rng) for rng in rngs], dtype=np.float64)
        flips = np.array([self.augment and self.hflip and rng.random() < 0.5 for rng in rngs])
        rows = torch.from_numpy(
            resize_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], h, self.size)
        ).unsqueeze(1)  # (n, 1, size, h)
        cols = resize_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], w, self.size)
        cols[flips] = cols[flips, ::-1]
        cols = torch.from_numpy(np.ascontiguousarray(cols)).transpose(1, 2).unsqueeze(1)
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)  # (n, C, h, w)
        y = (rows @ x @ cols).round_().clamp_(0, 255)  # (n, C, size, size)
        if self.palette is None:
            out.copy_(y)
            for row, rng in zip(out, rngs, strict=True):
                self.finish(row, rng)
            return out
        return out.copy_(self.palette.encode(y.permute(0, 2, 3, 1)).reshape(n, -1))

    def into(self, data: bytes | np.ndarray, rng: random.Random, out: torch.Tensor) -> torch.Tensor:
        """Writes one sample (encoded bytes, or raw pixels (h, w, C)) into `out`, a row of
        `batch(...)`: (C, H, W) uint8 or (H*W,) int64."""
        if not isinstance(data, np.ndarray):
            pixels = self.small(data)
            data = data if pixels is None else pixels
        if isinstance(data, np.ndarray):  # the same pixels as in a batch of them (the stream)
            return self.raw_into(data[None], [rng], out.unsqueeze(0))[0]
        return self.crop_into(data, rng, out)

    def crop_into(self, data: bytes, rng: random.Random, out: torch.Tensor) -> torch.Tensor:
        """`into` for an encoded image that `small` has turned down: decode its crop (libjpeg's
        crop decoder, which also flips it, or PIL), resize it into `out`."""
        crop, drawn = None, None
        if self.fast_jpeg and jpeg.is_jpeg(data) and jpeg.available():
            crop, drawn = _decode_jpeg(
                data, self.channels, lambda w, h: self.draw(w, h, rng), self.size
            )
            if crop is not None:
                return self._resize_into(crop, False, rng, out)  # flipped as decoded
        mode = "L" if self.channels == 1 else "RGB"

        def box_of(w: int, h: int) -> Box:  # PIL decides whether the image is readable
            nonlocal drawn
            drawn = drawn or self.draw(w, h, rng)  # a box drawn already is kept
            return drawn[0]

        crop = _decode_pil(data, mode, box_of, self.size)
        return self._resize_into(crop, drawn[1], rng, out)

    def _resize_into(
        self, crop: np.ndarray, flip: bool, rng: random.Random, out: torch.Tensor
    ) -> torch.Tensor:
        """A crop's pixels (h, w, C) -> `out`: flipped (before the resize, where it is smaller,
        and the same as after it: the filter is symmetric), resized, finished (or made tokens).
        A crop smaller than the output on both sides is upsampled by plain bilinear, which is
        the antialiased filter's result there (its support only widens when shrinking) and
        about 1.6x faster."""
        x = torch.from_numpy(crop)
        x = (x.flip(1) if flip else x).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w)
        if self.palette is None:
            pixels = out.unsqueeze(0)
        else:
            pixels = empty((1, self.size, self.size, self.channels), torch.uint8).permute(
                0, 3, 1, 2
            )
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            pixels.copy_(x)
        elif h <= self.size and w <= self.size:  # writing into the batch: no copies
            torch.ops.aten.upsample_bilinear2d.out(
                x, [self.size, self.size], False, None, None, out=pixels
            )
        else:  # F.interpolate's kernel (antialiased bilinear)
            torch.ops.aten._upsample_bilinear2d_aa.out(
                x, [self.size, self.size], False, None, None, out=pixels
            )
        self.finish(pixels[0], rng)
        if self.palette is not None:
            out.copy_(self.palette.encode(pixels[0].permute(1, 2, 0)).reshape(-1))
        return out
