"""Fixtures for the dataset tests: tiny real image files written into tmp_path."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


def _write_image(
    path: Path,
    size: tuple[int, int],
    color: tuple[int, ...] = (200, 60, 30),
    mode: str = "RGB",
    orientation: int | None = None,
) -> Path:
    """Write an image with ``size`` as stored (before EXIF orientation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(path, **kwargs)
    return path


def _huge_png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def _noisy_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """An image with random pixels, so that compressed files are not trivially small."""
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    Image.frombytes("RGB", size, data).save(path)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    return _write_image


@pytest.fixture
def noisy_image() -> Callable[..., Path]:
    return _noisy_image


@pytest.fixture
def huge_png() -> Callable[..., Path]:
    return _huge_png_header


@pytest.fixture
def truncate() -> Callable[..., Path]:
    return _truncate


def _schema_defaults(*path: object) -> dict:
    """The schema's defaults of one recipe object (the only place defaults are written)."""
    from loraforge.recipe.schema import fill_defaults, subschema

    return fill_defaults({}, subschema(path))


# Recipe defaults for building typed configs directly in unit tests (num_workers 0: in-process).
SUBSET_DEFAULTS = _schema_defaults("dataset", "subsets", 0)
DATASET_DEFAULTS = {**_schema_defaults("dataset"), "num_workers": 0}
DATASET_DEFAULTS["resolution"] = (DATASET_DEFAULTS["resolution"],) * 2


def _subset(dir: Path | str, **overrides):
    from loraforge.recipe import SubsetConfig

    return SubsetConfig(dir=str(dir), **{**SUBSET_DEFAULTS, **overrides})


def _dataset(*subsets, **overrides):
    from loraforge.recipe import DatasetConfig

    return DatasetConfig(subsets=tuple(subsets), **{**DATASET_DEFAULTS, **overrides})


@pytest.fixture
def subset_config() -> Callable[..., object]:
    return _subset


@pytest.fixture
def dataset_config() -> Callable[..., object]:
    return _dataset


class KohyaReference:
    """An independent, brute-force statement of sd-scripts' predefined bucketing, for checks.

    Written from the rules (not from loraforge's code): every bucket is the tallest step-multiple
    height that fits the area for each step-multiple width (both orientations) plus the largest
    step-multiple square within the area; an image takes the bucket with the least aspect-ratio
    error (the first in sorted order on ties; an image whose size is a bucket keeps it) and is
    scaled by the smallest factor that covers it, sides rounded half up.
    """

    @staticmethod
    def resolutions(max_reso, min_size, max_size, step):
        import math

        area = max_reso[0] * max_reso[1]
        grid = range(step, max(max_size, math.isqrt(area)) + step, step)
        square = max(s for s in grid if s * s <= area)
        found = {(square, square)}
        for width in range(min_size, max_size + 1, step):
            fitting = [h for h in grid if h * width <= area and h <= max_size]
            if fitting and max(fitting) >= min_size:
                found |= {(width, max(fitting)), (max(fitting), width)}
        return sorted(found)

    @staticmethod
    def cover(resolutions, width, height):
        import math

        if (width, height) in resolutions:
            bucket = (width, height)
        else:
            bucket = min(
                resolutions,
                key=lambda r: (abs(r[0] / r[1] - width / height), resolutions.index(r)),
            )
        scale = max(bucket[0] / width, bucket[1] / height)
        return bucket, (math.floor(width * scale + 0.5), math.floor(height * scale + 0.5))


@pytest.fixture(scope="session")
def kohya() -> KohyaReference:
    return KohyaReference()
