"""Image transforms: crops, reduced-scale JPEG decoding, pixels for the model."""

import ctypes
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import jpeg
from pipeline.data.transforms import (
    SMALL,
    ImageTransform,
    model_input,
    random_resized_crop_box,
)


def gradient_jpeg(w, h, quality=95):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), rgb


def test_crop_boxes_stay_inside_and_respect_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(300, 200, (0.2, 0.9), rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.19 <= w * h / 60000 <= 0.91 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_eval_transform_of_a_square_image_is_the_image():
    data, _ = gradient_jpeg(32, 32)
    out = ImageTransform(32, 3, augment=False)(data, random.Random(0))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, decoded)


def test_reduced_scale_decode_matches_a_full_decode_then_resize():
    """A 1024px JPEG cropped whole to 224 decodes at 1/4 scale; the result is close to the slow way."""
    data, _ = gradient_jpeg(1024, 1024)
    fast = ImageTransform(224, 3, augment=False)(data, random.Random(0)).astype(int)
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)[
        None
    ]
    slow = (
        torch.nn.functional.interpolate(full, size=(224, 224), mode="bilinear", antialias=True)[0]
        .numpy()
        .astype(int)
    )
    assert np.abs(fast - slow).mean() < 2.0


@pytest.mark.parametrize("augment", [True, False])
def test_output_shape_and_flip(augment):
    data, _ = gradient_jpeg(120, 80)
    t = ImageTransform(48, 3, augment=augment, crop_scale=(1.0, 1.0))
    outs = [t(data, random.Random(seed)) for seed in range(20)]
    assert all(o.shape == (3, 48, 48) and o.dtype == np.uint8 for o in outs)
    flipped = {
        bool(o[0, :, 0].mean() > o[0, :, -1].mean()) for o in outs
    }  # red grows left to right
    assert flipped == ({True, False} if augment else {False})


def test_model_input_maps_uint8_to_minus_one_one():
    x = torch.tensor([[0, 255, 51]], dtype=torch.uint8)
    torch.testing.assert_close(model_input(x), torch.tensor([[-1.0, 1.0, -0.6]]))
    f = torch.randn(3)
    assert model_input(f) is f


def photo(w, h, mode="RGB", **save):
    """A JPEG with detail at every scale (noise over gradients), so crops and chroma edges matter."""
    rng = np.random.default_rng(w * h)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,save",
    [
        ("RGB", {"subsampling": 2}),  # 4:2:0, the common case
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"subsampling": 0}),  # 4:4:4
        ("RGB", {"subsampling": 2, "progressive": True}),
        ("L", {}),
    ],
)
def test_crop_decode_gives_exactly_the_pixels_of_a_full_pil_decode(mode, save):
    assert jpeg.available(), "the JPEG crop decoder did not build (see the log's warning)"
    data = photo(203, 151, mode, **save)
    rng = random.Random(0)
    for denom in (1, 2, 4, 8):
        with Image.open(io.BytesIO(data)) as im:
            if denom > 1:
                im.draft(mode, (203 // denom, 151 // denom))
            full = np.asarray(im.convert(mode)).reshape(im.size[1], im.size[0], -1)
        height, width = full.shape[:2]
        assert (width, height) == jpeg.scaled_size(203, 151, denom)
        boxes = [(0, 0, width, height), (width - 1, height - 1, width, height)]
        # widths about the flip's blocks of 16 RGB pixels from each end (32 or more left)
        blocks = [(3, 5, 3 + w, 40) for w in (15, 16, 31, 32, 33, 47, 48, 64, 96, 97, 199)]
        boxes += [box for box in blocks if box[2] <= width and box[3] <= height]
        for _ in range(40):
            left, right = sorted(rng.sample(range(width + 1), 2))
            top, bottom = sorted(rng.sample(range(height + 1), 2))
            boxes.append((left, top, right, bottom))
        for left, top, right, bottom in boxes:
            crop = jpeg.decode_crop(data, (left, top, right, bottom), full.shape[2], denom)
            np.testing.assert_array_equal(crop, full[top:bottom, left:right])
            flipped = jpeg.decode_crop(
                data, (left, top, right, bottom), full.shape[2], denom, flip=True
            )
            np.testing.assert_array_equal(flipped, full[top:bottom, left:right][:, ::-1])
    assert jpeg.info(data) == (203, 151, 1 if mode == "L" else 3)  # the frame header's


def test_the_frame_header_is_found_past_large_segments_and_a_bad_walk_asks_libjpeg():
    """jpeg.info walks the segments to the frame header; an EXIF and an ICC profile (APP1,
    APP2) lie before it in camera files. Where the walk fails, libjpeg reads the header."""
    with Image.open(io.BytesIO(photo(40, 30))) as im:
        exif = im.getexif()
        exif[0x010E] = "x" * 3000  # ImageDescription: an APP1 segment of 3 KB
        buf = io.BytesIO()
        im.save(buf, format="JPEG", exif=exif, icc_profile=b"\xff\xc0" * 2000)
    data = buf.getvalue()
    # A frame marker's bytes inside the ICC segment, before the tables and the real one.
    assert data.index(b"\xff\xc0") < data.index(b"\xff\xdb")
    assert jpeg.info(data) == (40, 30, 3)
    found = (ctypes.c_int * 3)()
    assert jpeg._library().tessera_jpeg_frame(data, len(data), found) == 0  # by the walk
    assert tuple(found) == (40, 30, 3)
    # A header whose walk stops (a scan before any frame): libjpeg's error, as before.
    with pytest.raises(jpeg.JpegError):
        jpeg.info(b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 20)


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("side", [160, 1100])  # 1100: crops >= 2x the output decode reduced
def test_fast_and_pil_transforms_make_the_same_samples(augment, side):
    data = photo(side, side * 3 // 4)
    fast, slow = (ImageTransform(64, 3, augment, fast_jpeg=f) for f in (True, False))
    for seed in range(25):
        np.testing.assert_array_equal(
            fast(data, random.Random(seed)), slow(data, random.Random(seed))
        )


def test_any_bytes_like_sample_decodes_the_same():
    data = photo(120, 90)
    t = ImageTransform(32, 3, augment=True)
    expected = t(data, random.Random(3))
    for view in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(t(view, random.Random(3)), expected)


def test_damaged_jpegs_fall_back_to_pil_which_decides():
    """A truncated JPEG: libjpeg only warns (and would invent grey rows); PIL refuses it, as the
    stream's quarantine expects. Grey wanted from a colour JPEG goes to PIL's conversion."""
    data = photo(120, 90)
    t = ImageTransform(32, 3, augment=False)
    with pytest.raises(OSError, match="truncated"):
        t(data[: len(data) // 2], random.Random(0))
    with pytest.raises(jpeg.JpegError):
        jpeg.info(b"\xff\xd8\xff" + b"\0" * 20)
    grey = ImageTransform(32, 1, augment=False, fast_jpeg=True)(data, random.Random(0))
    expected = ImageTransform(32, 1, augment=False, fast_jpeg=False)(data, random.Random(0))
    np.testing.assert_array_equal(grey, expected)


def test_without_a_compiler_the_decoder_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(RuntimeError, match="libjpeg-dev"):
        jpeg.build()
    assert list(tmp_path.iterdir()) == []  # no half-written library left to load later


@pytest.mark.parametrize("w,h", [(190, 120), (20, 26), (90, 60)])  # down, up; small: down
def test_samples_are_resized_by_torch_antialiased_bilinear(w, h):
    """Large images: the crop is resized straight into the batch by torch's kernel (its out=
    form), so the pixels are F.interpolate's. Small ones (at most SMALL pixels) go through the
    same filter as weight matrices (raw_into): within one level of it (torch's uint8 kernel
    rounds its weights to fixed point)."""
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    out = ImageTransform(32, 3, augment=False)(buf.getvalue(), random.Random(0))
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    crop = torch.from_numpy(rgb[top : top + side, left : left + side]).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)
    assert out.flags.c_contiguous and out.shape == (3, 32, 32)
    if w * h > SMALL:
        np.testing.assert_array_equal(out, expected[0].numpy())
    else:
        assert np.abs(out.astype(int) - expected[0].numpy().astype(int)).max() <= 1


def test_a_crop_flipped_before_its_resize_and_upsampled_without_antialias_is_unchanged():
    """_resize_into flips the (smaller) crop before resizing and upsamples a crop smaller than
    the output on both sides with plain bilinear: the pixels are those of the antialiased
    resize followed by the flip, for crops smaller, larger and mixed."""
    t = ImageTransform(64, 3, augment=True)
    rng = np.random.default_rng(0)
    for h, w in [(30, 41), (64, 20), (64, 64), (80, 50), (20, 90), (150, 101), (7, 7)]:
        crop = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None]
        expected = torch.nn.functional.interpolate(
            x, size=(64, 64), mode="bilinear", antialias=True
        )
        for flip in (False, True):
            out = t.batch(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))[0]
            t._resize_into(crop, flip, random.Random(0), out)
            want = expected[0].flip(-1) if flip else expected[0]
            np.testing.assert_array_equal(out.numpy(), want.numpy(), err_msg=f"{h}x{w} {flip}")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("augment", [True, False])
def test_a_batch_of_raw_pixels_is_each_sample_transformed_alone(channels, augment):
    """raw_into (the stream's batched path) gives every sample what the one-sample transform
    gives it from the same rng (same crop box, same flip), and torch's kernel within one level."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 28, 28, channels), dtype=np.uint8)
    t = ImageTransform(24, channels, augment)
    out = torch.empty(12, 24, 24, channels, dtype=torch.uint8).permute(0, 3, 1, 2)
    t.raw_into(images, [random.Random(i) for i in range(12)], out)
    for i in range(12):
        alone = t(images[i], random.Random(i))
        np.testing.assert_array_equal(out[i].numpy(), alone)
        r = random.Random(i)
        left, top, right, bottom = t.crop_box(28, 28, r)
        crop = torch.from_numpy(images[i, top:bottom, left:right]).permute(2, 0, 1)[None]
        ref = torch.nn.functional.interpolate(crop, (24, 24), mode="bilinear", antialias=True)[0]
        if augment and r.random() < 0.5:
            ref = ref.flip(-1)
        assert (out[i].int() - ref.int()).abs().max() <= 1


def test_raw_pixels_change_channels_as_pil_converts():
    rgb = np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    out = torch.empty(1, 1, 16, 16, dtype=torch.uint8)
    ImageTransform(16, 1, augment=False).raw_into(rgb, [random.Random(0)], out)
    np.testing.assert_array_equal(
        out[0, 0].numpy(), np.asarray(Image.fromarray(rgb[0]).convert("L"))
    )


def test_without_the_built_decoder_jpegs_decode_with_pil(monkeypatch):
    monkeypatch.setattr(jpeg, "_library", lambda: None)  # as when the build failed
    assert not jpeg.available()
    data = photo(120, 90)
    out = ImageTransform(32, 3, augment=True)(data, random.Random(1))
    expected = ImageTransform(32, 3, augment=True, fast_jpeg=False)(data, random.Random(1))
    np.testing.assert_array_equal(out, expected)


def test_a_jpeg_declaring_billions_of_pixels_is_refused_before_any_allocation():
    """A few hundred bytes whose header says 65000 x 65000: PIL's decompression-bomb limit
    holds on the fast path too, and the sample goes to PIL, which refuses it as well."""
    data = bytearray(photo(64, 48))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height width
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    with pytest.raises(jpeg.JpegError, match="decompression-bomb limit"):
        jpeg.info(bytes(data))
    with pytest.raises(jpeg.JpegError, match="decompression-bomb limit"):
        jpeg.decode_crop(bytes(data), (0, 0, 8, 8), 3, size=(65000, 65000))
    with pytest.raises(Image.DecompressionBombError):
        ImageTransform(32, 3, augment=False)(bytes(data), random.Random(0))
