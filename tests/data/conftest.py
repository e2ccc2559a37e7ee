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
