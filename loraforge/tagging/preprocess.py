"""Image preprocessing for WD14-family taggers, exactly as the models were trained to see images.

The reference is SmilingWolf's tagger demo (the models' author): transparency composited on
white, padded to a centred square with white, resized with bicubic filtering to the model's
input size (only when the sizes differ), RGB turned into BGR, float32 in 0..255, NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
WHITE = (255, 255, 255)


def composite_on_white(image: Image.Image) -> Image.Image:
    """An RGB image with any transparency composited over white (other modes just converted)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def pad_to_square(image: Image.Image) -> Image.Image:
    """Centre an RGB image on a white square whose side is its longer side.

    The left/top padding is ``(side - size) // 2``, the extra pixel of an odd difference goes
    right/bottom, as in the reference.
    """
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def wd14_array(image: Image.Image, size: int) -> np.ndarray:
    """One image as the tagger's input row.

    Args:
        image: any PIL image (alpha is composited on white).
        size: the model's input side, read from the ONNX input shape.

    Returns:
        ``float32`` array of shape ``(size, size, 3)``, channels BGR, values 0..255.
    """
    square = pad_to_square(composite_on_white(image))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def wd14_batch(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """Stack :func:`wd14_array` of each image: ``float32`` of shape ``(N, size, size, 3)``."""
    if not images:
        return np.zeros((0, size, size, 3), dtype=np.float32)
    return np.stack([wd14_array(im, size) for im in images], axis=0)
