"""Pixel work for one sample: resize to the bucket, crop, colour augmentation, flip.

numpy and Pillow only (no torch, no OpenCV), so latent caching and the torch Dataset share it.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from loraforge.data.buckets import BucketAssignment, Size

# sd-scripts' colour augmentation (AugHelper.color_aug, its albumentations replacement):
# with probability 0.33 either a hue shift of up to 8 OpenCV hue units (of 180, i.e. 16 degrees)
# or a "gamma" of 0.95-1.05 applied to the 0-255 values, each half of the time.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0 / 180.0
GAMMA_RANGE = (0.95, 1.05)


def resize_and_crop(image: Image.Image, assignment: BucketAssignment, origin: Size) -> Image.Image:
    """Resize ``image`` to ``assignment.resized`` and cut the bucket out at ``origin``.

    Downscaling averages (box filter, like OpenCV's INTER_AREA that sd-scripts uses), upscaling
    uses Lanczos (as sd-scripts).

    Args:
        image: the upright RGB image at its displayed size.
        assignment: its bucket assignment.
        origin: crop top-left ``(left, top)`` in the resized image.

    Returns:
        An image of exactly ``assignment.bucket``.
    """
    resized_w, resized_h = assignment.resized
    if image.size != (resized_w, resized_h):
        shrinking = image.width >= resized_w and image.height >= resized_h
        method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        image = image.resize((resized_w, resized_h), method)
    left, top = origin
    width, height = assignment.bucket
    if (left, top, width, height) != (0, 0, resized_w, resized_h):
        image = image.crop((left, top, left + width, top + height))
    return image


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour augmentation on an ``(H, W, 3)`` uint8 RGB array.

    Draws (in this order): whether to augment (p=0.33), hue shift or gamma (half each), then the
    amount. Returns the input unchanged when not augmenting.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return pixels
    if rng.random() > 0.5:
        return hue_shift(pixels, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    gamma = rng.uniform(*GAMMA_RANGE)
    # Like sd-scripts: the exponent applies to 0-255 values, which also shifts brightness.
    return np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def hue_shift(pixels: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an ``(H, W, 3)`` uint8 RGB array by ``shift`` turns (1.0 = 360 degrees).

    Saturation and value are kept; greys stay grey.
    """
    rgb = pixels.astype(np.float64) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    chroma = value - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(chroma > 0, hue, 0.0) / 6.0
    hue = (hue + shift) % 1.0
    sector = hue * 6.0
    x = chroma * (1.0 - np.abs(sector % 2.0 - 1.0))
    index = np.floor(sector).astype(np.int64) % 6
    zeros = np.zeros_like(chroma)
    table = np.stack(
        [
            np.stack([chroma, x, zeros], -1),
            np.stack([x, chroma, zeros], -1),
            np.stack([zeros, chroma, x], -1),
            np.stack([zeros, x, chroma], -1),
            np.stack([x, zeros, chroma], -1),
            np.stack([chroma, zeros, x], -1),
        ],
        axis=0,
    )
    out = np.take_along_axis(table, index[None, ..., None].repeat(3, -1), axis=0)[0]
    out = out + low[..., None]
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def flip_horizontal(pixels: np.ndarray) -> np.ndarray:
    """Mirror an ``(H, W, C)`` array left-right (a contiguous copy)."""
    return np.ascontiguousarray(pixels[:, ::-1])


def flipped_crop_origin(origin: Size, assignment: BucketAssignment) -> Size:
    """The crop top-left as seen in the mirrored image (the left offset is measured from the
    other side of the resized image)."""
    return assignment.excess[0] - origin[0], origin[1]
