"""Fused JPEG decode-and-crop with libjpeg-turbo (jpeg.c), for the random resized crop.

A ViT crop keeps on average about half of an image, and PIL decodes all of it, then copies it
into an array. `decode_crop` decodes only the crop's rows and iMCU columns, straight into a
numpy buffer: the pixels are the same as a full decode's (tests/test_transforms.py checks that
against PIL). benchmarks/loader.py measures the stream with it against a bare PIL decode loop.

jpeg.c is compiled on first use with the system C compiler against the system's libjpeg
(`libjpeg-dev` on Debian and Ubuntu, which `make install` installs), cached by source hash under
TESSERA_CACHE (default ~/.cache/tessera); `tessera build-ops` builds it ahead of a job. Without
a compiler or the headers, `available()` is False, transforms decode with PIL, and one warning
says how to get the fast path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("jpeg.c")
_MESSAGE = 200


class JpegError(ValueError):
    """libjpeg refused the data (corrupt, truncated, unsupported colour space)."""


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera")


def build(log_to=log.info) -> Path:
    """Compiles jpeg.c into the cache (once per source version) and returns the library's path.
    Raises RuntimeError with the compiler's output when it cannot."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    lib = cache_dir() / f"jpeg-{digest}-{platform.machine()}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) to build the JPEG crop decoder")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.tmp-{os.getpid()}")
    cmd = [cc, "-O2", "-shared", "-fPIC", str(SOURCE), "-ljpeg", "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"building the JPEG crop decoder failed ({' '.join(cmd)}): {done.stderr.strip()[-600:]}"
            " -- it needs libjpeg-turbo's headers (Debian, Ubuntu: apt-get install libjpeg-dev)"
        )
    os.replace(tmp, lib)  # atomic: ranks and workers building at once each publish a whole file
    log_to(f"JPEG crop decoder: built {lib}")
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("JPEG crops decode with PIL (slower): %s", e)
        return None
    lib.tessera_jpeg_info.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_char_p]  # fmt: skip
    lib.tessera_jpeg_frame.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    lib.tessera_jpeg_decode_crop.argtypes = [
        ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
    ]  # fmt: skip
    return lib


def available() -> bool:
    return _library() is not None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def info(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from the header: its frame header, found by a walk over the
    segments before it, or where that fails, libjpeg's reading of the header (whose error is
    the one raised)."""
    data = data if isinstance(data, bytes) else bytes(data)  # ctypes passes bytes without a copy
    out = (ctypes.c_int * 3)()
    if _library().tessera_jpeg_frame(data, len(data), out) != 0:
        message = ctypes.create_string_buffer(_MESSAGE)
        if _library().tessera_jpeg_info(data, len(data), out, message) != 0:
            raise JpegError(message.value.decode(errors="replace"))
    check_pixels(out[0], out[1])
    return out[0], out[1], out[2]


def check_pixels(width: int, height: int) -> None:
    """PIL's decompression-bomb limit, on this path too: a few bytes can declare 65k x 65k
    pixels, gigabytes to allocate. Refused above 2x Image.MAX_IMAGE_PIXELS, where PIL refuses
    (None turns the check off in both)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise JpegError(
            f"{width}x{height} = {width * height} pixels, over the decompression-bomb limit of "
            f"{2 * limit} (2x PIL.Image.MAX_IMAGE_PIXELS)"
        )


def scaled_size(width: int, height: int, denom: int) -> tuple[int, int]:
    """The image's size decoded at 1/denom (libjpeg rounds up)."""
    return -(-width // denom), -(-height // denom)


def decode_crop(
    data: bytes, box: tuple[int, int, int, int], channels: int, denom: int = 1,
    size: tuple[int, int] | None = None, flip: bool = False,
) -> np.ndarray:  # fmt: skip
    """Pixels (bottom - top, right - left, channels) uint8 of `box` (left, top, right, bottom)
    in the image decoded at 1/denom, mirrored left to right with `flip`. `size`: the (width,
    height) of the image, if known."""
    data = data if isinstance(data, bytes) else bytes(data)
    width, height = size or info(data)[:2]
    check_pixels(width, height)
    out_w, _ = scaled_size(width, height, denom)
    left, top, right, bottom = box
    out = np.empty((bottom - top, out_w, channels), dtype=np.uint8)
    message = ctypes.create_string_buffer(_MESSAGE)
    status = _library().tessera_jpeg_decode_crop(
        data,
        len(data),
        denom,
        channels,
        left,
        top,
        right,
        bottom,
        int(flip),
        out.ctypes.data,
        out_w,
        message,
    )
    if status != 0:
        raise JpegError(message.value.decode(errors="replace"))
    return out[:, left:right]
