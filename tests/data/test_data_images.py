"""Image IO: listing, header sizes with EXIF orientation, RGB decoding, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from loraforge.data.folders import list_image_files
from loraforge.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    load_image_rgb,
    read_image_size,
)
from loraforge.errors import DatasetError


def test_extensions_are_lower_case_and_cover_the_usual_formats() -> None:
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        assert ext in IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_list_is_sorted_case_insensitive_and_skips_hidden_and_other_files(
    tmp_path: Path, write_image
) -> None:
    write_image(tmp_path / "b.PNG", (8, 8))
    write_image(tmp_path / "a.JpG", (8, 8))
    write_image(tmp_path / "c.webp", (8, 8))
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "._a.jpg").write_bytes(b"resource fork")
    (tmp_path / "dir.png").mkdir()
    write_image(tmp_path / "sub" / "d.png", (8, 8))
    write_image(tmp_path / ".hidden" / "e.png", (8, 8))

    assert [p.name for p in list_image_files(tmp_path)] == ["a.JpG", "b.PNG", "c.webp"]
    recursive = list_image_files(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in recursive] == [
        "a.JpG",
        "b.PNG",
        "c.webp",
        "sub/d.png",
    ]


def test_list_of_missing_folder_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        list_image_files(tmp_path / "nope")


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.webp", "x.bmp", "x.gif", "x.tiff"])
def test_size_from_header(tmp_path: Path, write_image, name: str) -> None:
    write_image(tmp_path / name, (37, 21))
    assert read_image_size(tmp_path / name) == (37, 21)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(1, (40, 30)), (2, (40, 30)), (3, (40, 30)), (4, (40, 30))]
    + [(o, (30, 40)) for o in (5, 6, 7, 8)],
)
def test_exif_orientation_gives_displayed_size(
    tmp_path: Path, write_image, orientation: int, expected: tuple[int, int]
) -> None:
    path = write_image(tmp_path / "phone.jpg", (40, 30), orientation=orientation)
    assert read_image_size(path) == expected
    assert load_image_rgb(path).size == expected


def test_exif_orientation_in_png_and_webp(tmp_path: Path, write_image) -> None:
    for name in ("r.png", "r.webp"):
        path = write_image(tmp_path / name, (40, 30), orientation=6)
        assert read_image_size(path) == (30, 40)
        assert load_image_rgb(path).size == (30, 40)


def test_header_read_does_not_decode_pixels(tmp_path: Path, write_image, monkeypatch) -> None:
    jpg = write_image(tmp_path / "x.jpg", (64, 48), orientation=6)
    png = write_image(tmp_path / "x.png", (64, 48), orientation=8)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", forbidden)
    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)
    assert read_image_size(jpg) == (48, 64)
    assert read_image_size(png) == (48, 64)


def test_rotated_pixels_are_upright(tmp_path: Path) -> None:
    # Stored: left half red, right half blue, 20x10. Orientation 6 = rotate 90 degrees clockwise
    # for display, so the displayed image is 10x20 with red on top.
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.png"
    stored.save(path, exif=exif.tobytes())
    shown = np.asarray(load_image_rgb(path))
    assert shown.shape == (20, 10, 3)
    assert tuple(shown[2, 5]) == (255, 0, 0)
    assert tuple(shown[17, 5]) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "color"),
    [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0)), ("RGBA", (255, 0, 0, 128))],
)
def test_transparency_is_composited_on_white(tmp_path: Path, mode: str, color) -> None:
    path = tmp_path / "t.png"
    Image.new(mode, (4, 4), color).save(path)
    pixel = np.asarray(load_image_rgb(path))[0, 0].astype(int)
    alpha = color[-1] / 255.0
    base = color[:3] if mode == "RGBA" else (color[0],) * 3
    expected = [round(c * alpha + 255 * (1 - alpha)) for c in base]
    assert load_image_rgb(path).mode == "RGB"
    assert np.all(np.abs(pixel - np.array(expected)) <= 1)


def test_palette_transparency_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert tuple(np.asarray(load_image_rgb(path))[1, 1]) == (255, 255, 255)


def test_other_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (5, 5), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("L", (5, 5), 128).save(tmp_path / "l.png")
    Image.new("I;16", (5, 5), 65535).save(tmp_path / "i16.png")
    for name in ("c.jpg", "l.png", "i16.png"):
        img = load_image_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 5)
    assert tuple(np.asarray(load_image_rgb(tmp_path / "i16.png"))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_image_rgb(tmp_path / "l.png"))[0, 0]) == (128, 128, 128)


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(BadImageError) as info:
        read_image_size(path, **kwargs)
    assert isinstance(info.value, DatasetError)
    assert info.value.path == path
    return info.value.reason


def test_bad_files_raise_with_reasons(tmp_path: Path, noisy_image, truncate, huge_png) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture")
    png = truncate(noisy_image(tmp_path / "cut.png", (64, 64)))
    jpg = truncate(noisy_image(tmp_path / "cut.jpg", (64, 64)))
    bomb = huge_png(tmp_path / "bomb.png", 100_000, 100_000)
    under_default = huge_png(tmp_path / "big.png", 10_000, 10_000)

    assert "empty" in _reason(tmp_path / "zero.png")
    assert "not an image" in _reason(tmp_path / "text.jpg")
    assert "truncated" in _reason(png)
    assert "truncated" in _reason(jpg)
    assert "too large" in _reason(bomb)
    assert "too large" in _reason(under_default, max_pixels=50_000_000)
    assert "not found" in _reason(tmp_path / "missing.png")
    for path in (png, jpg):
        with pytest.raises(BadImageError):
            load_image_rgb(path)


def test_trailer_after_jpeg_end_marker_is_not_truncation(tmp_path: Path, noisy_image) -> None:
    path = noisy_image(tmp_path / "trailer.jpg", (32, 16))
    with path.open("ab") as f:
        f.write(b"SAMSUNG-TRAILER-DATA")
    assert read_image_size(path) == (32, 16)


def test_permission_denied_is_reported(tmp_path: Path, write_image, monkeypatch) -> None:
    path = write_image(tmp_path / "locked.png", (8, 8))
    real_open = Path.open

    def guarded_open(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # The tests may run as root, where chmod 000 does not stop reading: simulate the OS answer.
    monkeypatch.setattr(Path, "open", guarded_open)
    assert _reason(path) == "permission denied"
    with pytest.raises(BadImageError, match="permission denied"):
        load_image_rgb(path)


def test_misnamed_file_is_still_read(tmp_path: Path, write_image) -> None:
    jpeg = write_image(tmp_path / "real.jpg", (30, 20))
    misnamed = tmp_path / "actually_jpeg.png"
    misnamed.write_bytes(jpeg.read_bytes())
    assert read_image_size(misnamed) == (30, 20)
    assert load_image_rgb(misnamed).size == (30, 20)
