"""WD14 preprocessing against an independent numpy computation of the expected input tensor
(``kit.expected_input`` in conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loraforge.tagging.preprocess import wd14_array, wd14_batch


def random_pixels(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (5, 8), (8, 3), (7, 4), (1, 8)])
def test_pad_and_bgr_without_resize(h: int, w: int, kit) -> None:
    pixels = random_pixels(h, w, 3, seed=h * 10 + w)
    got = wd14_array(Image.fromarray(pixels, "RGB"), size=8)
    assert got.dtype == np.float32 and got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, kit.expected_input(pixels, 8))


def test_channel_order_is_bgr() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    got = wd14_array(Image.fromarray(red, "RGB"), size=4)
    assert np.all(got[..., 2] == 255) and np.all(got[..., 0] == 0) and np.all(got[..., 1] == 0)


def test_odd_padding_goes_right_and_bottom() -> None:
    black = np.zeros((2, 5, 3), np.uint8)  # 3 rows of padding: 1 above, 2 below
    got = wd14_array(Image.fromarray(black, "RGB"), size=5)
    assert np.all(got[0] == 255) and np.all(got[1:3] == 0) and np.all(got[3:] == 255)


def test_transparency_is_composited_on_white(kit) -> None:
    pixels = random_pixels(6, 4, 4, seed=3)
    pixels[..., 3] = np.where(np.arange(4) % 2 == 0, 0, 255)[None, :]  # columns clear/opaque
    got = wd14_array(Image.fromarray(pixels, "RGBA"), size=6)
    np.testing.assert_array_equal(got, kit.expected_input(pixels, 6))


def test_semi_transparent_pixels_blend_with_white(kit) -> None:
    pixels = random_pixels(6, 6, 4, seed=4)
    got = wd14_array(Image.fromarray(pixels, "RGBA"), size=6)
    # PIL blends in integers; the float reference may differ by one level.
    np.testing.assert_allclose(got, kit.expected_input(pixels, 6), atol=1.0)


@pytest.mark.parametrize(("h", "w"), [(20, 20), (12, 30), (3, 5)])
def test_resized_to_model_size_with_bicubic(h: int, w: int, kit) -> None:
    pixels = random_pixels(h, w, 3, seed=h + w)
    got = wd14_array(Image.fromarray(pixels, "RGB"), size=8)
    assert got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, kit.expected_input(pixels, 8))


def test_palette_and_greyscale_images_become_rgb(kit) -> None:
    grey = Image.fromarray(np.full((4, 4), 100, np.uint8), "L")
    assert np.all(wd14_array(grey, 4) == 100)
    palette = Image.fromarray(random_pixels(4, 4, 3), "RGB").convert("P")
    expected = kit.expected_input(np.asarray(palette.convert("RGB")), 4)
    np.testing.assert_array_equal(wd14_array(palette, 4), expected)


def test_batch_stacks_rows_nhwc(kit) -> None:
    images = [Image.fromarray(random_pixels(5, 7, 3, seed=s), "RGB") for s in range(3)]
    batch = wd14_batch(images, 8)
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], kit.expected_input(np.asarray(image), 8))
    assert wd14_batch([], 8).shape == (0, 8, 8, 3)
