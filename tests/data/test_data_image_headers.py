"""The PNG/JPEG header fast path agrees with Pillow, and steps aside for anything unusual."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from loraforge.data.image_headers import plain_header_size
from loraforge.data.images import read_image_size


def _pillow(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as img:
        orientation = img.getexif().get(0x0112, 1)
        return img.size[0], img.size[1], orientation


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "maker"  # another tag first, so the search has to walk the directory
    return exif.tobytes()


def _fast(data: bytes, extension: str):
    return plain_header_size(io.BytesIO(data), len(data), extension)


PLAIN = [
    ("rgb png", lambda: _encode(Image.new("RGB", (37, 21)), "PNG"), ".png"),
    ("rgba png", lambda: _encode(Image.new("RGBA", (8, 300)), "PNG"), ".png"),
    ("palette png", lambda: _encode(Image.new("P", (19, 7)), "PNG", transparency=0), ".png"),
    ("16-bit png", lambda: _encode(Image.new("I;16", (5, 6)), "PNG"), ".png"),
    ("1-bit png", lambda: _encode(Image.new("1", (33, 2)), "PNG"), ".png"),
    ("interlaced png", lambda: _encode(Image.new("RGB", (40, 9)), "PNG", interlace=1), ".png"),
    ("png with text", lambda: _encode(Image.new("L", (9, 4)), "PNG", pnginfo=_text()), ".png"),
    ("icc png", lambda: _encode(Image.new("RGB", (12, 13)), "PNG", icc_profile=b"x" * 300), ".png"),
    ("jpeg", lambda: _encode(Image.new("RGB", (64, 48)), "JPEG"), ".jpg"),
    ("grey jpeg", lambda: _encode(Image.new("L", (31, 77)), "JPEG"), ".jpeg"),
    ("progressive", lambda: _encode(Image.new("RGB", (50, 20)), "JPEG", progressive=True), ".jpg"),
    (
        "icc jpeg",
        lambda: _encode(Image.new("RGB", (10, 11)), "JPEG", icc_profile=b"y" * 70),
        ".jpg",
    ),
] + [
    (
        f"jpeg exif {o}",
        lambda o=o: _encode(Image.new("RGB", (30, 10)), "JPEG", exif=_exif(o)),
        ".jpg",
    )
    for o in range(1, 9)
]


def _text():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a prompt")
    info.add_text("comment", "zipped " * 50, zip=True)
    return info


@pytest.mark.parametrize(("name", "make", "extension"), PLAIN, ids=[p[0] for p in PLAIN])
def test_plain_files_are_read_from_the_header_exactly_as_pillow_reads_them(name, make, extension):
    data = make()
    assert _fast(data, extension) == _pillow(data)


def test_big_endian_exif_is_read():
    exif = _exif(6)
    swapped = Image.Exif()
    swapped.load(exif)
    swapped.endian = ">"
    data = _encode(Image.new("RGB", (30, 10)), "JPEG", exif=swapped.tobytes())
    assert data.find(b"MM\x00*") > 0
    assert _fast(data, ".jpg") == (30, 10, 6)


UNUSUAL = {
    "png with exif": (_encode(Image.new("RGB", (4, 4)), "PNG", exif=_exif(6)), ".png"),
    "png without IEND": (_encode(Image.new("RGB", (40, 40)), "PNG")[:-12], ".png"),
    "jpeg without EOI": (_encode(Image.new("RGB", (40, 40)), "JPEG")[:-2], ".jpg"),
    "jpeg cut in its header": (_encode(Image.new("RGB", (4, 4)), "JPEG")[:30], ".jpg"),
    "png with a bad IHDR crc": (None, ".png"),
    "jpeg named png": (_encode(Image.new("RGB", (4, 4)), "JPEG"), ".png"),
    "png named jpg": (_encode(Image.new("RGB", (4, 4)), "PNG"), ".jpg"),
    "webp": (_encode(Image.new("RGB", (4, 4)), "WEBP"), ".webp"),
    "empty": (b"", ".png"),
    "garbage": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ".png"),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_anything_unusual_is_left_to_pillow(name):
    data, extension = UNUSUAL[name]
    if data is None:
        good = bytearray(_encode(Image.new("RGB", (4, 4)), "PNG"))
        good[29] ^= 0xFF  # the first byte of IHDR's CRC
        data = bytes(good)
    assert _fast(data, extension) is None


def test_read_image_size_takes_the_fast_path_and_still_rotates(tmp_path, monkeypatch):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(_encode(Image.new("RGB", (30, 10)), "JPEG", exif=_exif(6)))
    # Pillow is not consulted for a plain file: make it fail if it were.
    monkeypatch.setattr("loraforge.data.images._identify", _refuse)
    assert read_image_size(path) == (10, 30)


def test_the_pixel_limit_still_applies_on_the_fast_path(tmp_path):
    from loraforge.data.images import BadImageError

    path = tmp_path / "big.png"
    path.write_bytes(_encode(Image.new("L", (100, 100)), "PNG"))
    with pytest.raises(BadImageError, match="too large"):
        read_image_size(path, max_pixels=9_999)


def _refuse(*args, **kwargs):
    raise AssertionError("Pillow was asked for a plain file's size")
