"""DeiT's augmentations: RandAugment and random erasing per sample, Mixup and CutMix per
micro-batch, all drawn from seeds a resume reproduces."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.augment import NAMES, OPS, rand_augment, random_erase
from pipeline.data.transforms import ImageTransform
from pipeline.train.objectives import mix


def image(seed=0, channels=3, side=24):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (channels, side, side), dtype=np.uint8))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_operation_keeps_shape_and_dtype_on_grey_and_colour(name, channels):
    array = image(channels=channels).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if channels == 1 else array)
    out = np.asarray(OPS[name](pil, 0.9, random.Random(0)))
    assert out.dtype == np.uint8 and out.reshape(array.shape).shape == array.shape


def test_randaugment_is_a_function_of_the_samples_rng():
    a, b, c = image(), image(), image()
    rand_augment(a, 2, 9, random.Random(5))
    rand_augment(b, 2, 9, random.Random(5))
    assert torch.equal(a, b)
    changed = 0
    for seed in range(20):  # at 0.5 per operation, most draws change the image
        d = image()
        rand_augment(d, 2, 9, random.Random(seed))
        changed += not torch.equal(d, c)
    assert changed >= 10


def test_random_erasing_replaces_one_rectangle_of_2_to_33_percent():
    for seed in range(20):
        x = torch.zeros(3, 32, 32, dtype=torch.uint8)
        random_erase(x, 1.0, random.Random(seed))
        rows, cols = (x != 0).any(0).any(1).nonzero(), (x != 0).any(0).any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 0.02 * 1024 * 0.8 <= h * w <= 1024 / 3 * 1.2, (seed, h, w)
    x = torch.zeros(3, 32, 32, dtype=torch.uint8)
    random_erase(x, 0.0, random.Random(0))
    assert not x.any()


def test_the_transform_applies_them_after_the_crop_only_when_augmenting():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    plain = ImageTransform(24, 3, True)
    deit = ImageTransform(24, 3, True, randaugment_ops=2, randaugment_magnitude=9, erasing=1.0)
    evaluation = ImageTransform(24, 3, False, randaugment_ops=2, erasing=1.0)
    assert not np.array_equal(plain(pixels, random.Random(1)), deit(pixels, random.Random(1)))
    np.testing.assert_array_equal(deit(pixels, random.Random(1)), deit(pixels, random.Random(1)))
    np.testing.assert_array_equal(
        evaluation(pixels, random.Random(1)), ImageTransform(24, 3, False)(pixels, random.Random(1))
    )
    # The batched path (raw pixels) draws the same per sample as the one-sample path.
    batch = np.stack([pixels] * 4)
    out = torch.empty(4, 24, 24, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    deit.raw_into(batch, [random.Random(i) for i in range(4)], out)
    for i in range(4):
        np.testing.assert_array_equal(out[i].numpy(), deit(pixels, random.Random(i)))


def test_mixup_blends_each_image_with_its_mirror_in_the_batch_and_the_targets_alike():
    x = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    gen = torch.Generator().manual_seed(3)
    mixed, target = mix(x, labels, 10, 0.8, 0.0, gen)
    lam = target[0, 0].item()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    assert target[0, 5] == pytest.approx(1 - lam)
    again = mix(x, labels, 10, 0.8, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed)  # the same seed, the same mix


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    for seed in range(10):
        mixed, target = mix(
            x, torch.tensor([0, 1]), 2, 0.0, 1.0, torch.Generator().manual_seed(seed)
        )
        pasted = (mixed[0] != x[0]).float().mean().item()
        assert target[0, 1].item() == pytest.approx(pasted)
        assert ((mixed[0] == x[0]) | (mixed[0] == x[1])).all()


def test_validation_is_never_mixed():
    from pipeline.models import create_model
    from pipeline.train.objectives import supervised

    model = create_model("vit-micro-p4")
    torch.nn.init.normal_(model.head.weight)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
             "label": torch.tensor([0, 1, 2, 3])}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    model.eval()
    assert torch.equal(
        supervised(model, batch)[0], supervised(model, batch, mixup=0.8, generator=gen)[0]
    )
    model.train()
    assert not torch.equal(
        supervised(model, batch)[0], supervised(model, batch, mixup=0.8, generator=gen)[0]
    )
