"""Image transforms: crops, reduced-scale JPEG decoding, pixels for the model."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import ImageTransform, model_input, random_resized_crop_box


def jpeg(w, h, quality=95):
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
    data, _ = jpeg(32, 32)
    out = ImageTransform(32, 3, augment=False)(data, random.Random(0))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, decoded)


def test_reduced_scale_decode_matches_a_full_decode_then_resize():
    """A 1024px JPEG cropped whole to 224 decodes at 1/4 scale; the result is close to the slow way."""
    data, _ = jpeg(1024, 1024)
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
    data, _ = jpeg(120, 80)
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
