"""Colour palettes: k-means recovers colours, encode/decode, fixed palettes, save/load."""

import numpy as np
import pytest
import torch

from pipeline.data.palette import Palette, fit_palette, sample_pixels

TRUE_COLOURS = np.array(
    [
        [250, 10, 10],
        [10, 250, 10],
        [10, 10, 250],
        [240, 240, 20],
        [20, 240, 240],
        [240, 20, 240],
        [128, 128, 128],
        [30, 30, 30],
    ],
    dtype=np.float32,
)


def synthetic_images(n=200, size=16, noise=4.0, seed=0):
    """Images of random rectangles, each pixel one of TRUE_COLOURS plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids = np.full((size, size), rng.integers(len(TRUE_COLOURS)))
        for _ in range(3):
            y, x = rng.integers(0, size, 2)
            ids[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = rng.integers(
                len(TRUE_COLOURS)
            )
        img = TRUE_COLOURS[ids] + rng.normal(0, noise, (size, size, 3))
        yield np.clip(img, 0, 255).astype(np.uint8)


def test_kmeans_recovers_the_colours_of_a_synthetic_set():
    palette = fit_palette(sample_pixels(synthetic_images(), per_image=64, batch_pixels=2048), k=8)
    dist = torch.cdist(torch.tensor(TRUE_COLOURS), palette.colours)
    assert dist.min(1).values.max() < 3.0  # every true colour has a centre within 3 levels
    assert len(set(dist.argmin(1).tolist())) == 8  # ... and a centre of its own


def test_kmeans_streams_many_batches_without_holding_them():
    seen = []

    def batches():
        for b in sample_pixels(synthetic_images(n=400), per_image=32, batch_pixels=512):
            seen.append(len(b))
            yield b

    fit_palette(batches(), k=8)
    assert len(seen) >= 20


def test_encode_decode_is_exact_on_palette_colours():
    palette = Palette(TRUE_COLOURS)
    ids = torch.randint(0, 8, (4, 5, 6))
    images = palette.decode(ids)
    assert images.shape == (4, 5, 6, 3) and images.dtype == torch.uint8
    torch.testing.assert_close(palette.encode(images), ids)


def test_uniform_palette_has_512_colours_at_bin_centres():
    palette = Palette.uniform(bits=3)
    assert palette.size == 512 and palette.channels == 3
    img = np.array([[[0, 100, 255]]], dtype=np.uint8)
    # 3 bits per channel: bins of 32 levels; 0 -> bin 0, 100 -> bin 3, 255 -> bin 7.
    assert palette.encode(img).item() == 0 * 64 + 3 * 8 + 7
    torch.testing.assert_close(
        palette.decode(palette.encode(img)), torch.tensor([[[16, 112, 240]]], dtype=torch.uint8)
    )


def test_grey_palette_quantizes_one_channel():
    palette = Palette.grey(16)
    img = np.arange(0, 256, dtype=np.uint8).reshape(16, 16, 1)
    tokens = palette.encode(img)
    assert tokens.min() == 0 and tokens.max() == 15
    assert (palette.decode(tokens).int() - torch.as_tensor(img).int()).abs().max() <= 8


def test_channel_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 channels"):
        Palette.grey(16).encode(np.zeros((2, 2, 3), dtype=np.uint8))


def test_decode_rejects_ids_outside_the_palette():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        Palette.grey(16).decode(torch.tensor([3, 16]))


@pytest.mark.parametrize("url", ["memory://palettes/p.json", "local"])
def test_save_load_round_trip(url, tmp_path):
    url = str(tmp_path / "p.json") if url == "local" else url
    palette = fit_palette(sample_pixels(synthetic_images(n=50)), k=8)
    palette.save(url)
    loaded = Palette.load(url)
    torch.testing.assert_close(loaded.colours, palette.colours, atol=1e-3, rtol=0)
