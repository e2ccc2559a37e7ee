"""Image files: which files count as images, their displayed size from headers, and RGB decoding.

Sizes come from the file header (``PIL.Image.open`` does not decode pixels) with the EXIF
orientation applied, so a phone photo stored landscape but shown portrait is reported portrait.
Every problem with a file raises :class:`BadImageError`, whose ``reason`` is a short phrase for
reports ("empty file (0 bytes)", "truncated", "not an image", …); scanners catch it, list the
file and go on.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from loraforge.data.image_headers import plain_header_size
from loraforge.errors import DatasetError

# The formats people train on, plus the modern ones when this Pillow can open them. Lower case;
# matching is case-insensitive. Kept explicit (not every extension Pillow registers) so that
# icons, PostScript or scientific formats sitting in a dataset folder are not picked up.
_BASE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)
_OPTIONAL_EXTENSIONS = (".avif", ".heic", ".heif", ".jxl")


def _supported_extensions() -> tuple[str, ...]:
    Image.init()
    registered = Image.registered_extensions()
    extra = tuple(ext for ext in _OPTIONAL_EXTENSIONS if registered.get(ext) in Image.OPEN)
    return _BASE_EXTENSIONS + extra


IMAGE_EXTENSIONS: tuple[str, ...] = _supported_extensions()

# Pillow's own bomb limit (~89.5 megapixels). Beyond it an image is reported, not decoded:
# a 30000x30000 PNG of a few kilobytes would otherwise take gigabytes of memory.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

# EXIF orientations 5-8 are transposes/rotations by 90 degrees: displayed width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


class BadImageError(DatasetError):
    """An image file cannot be used.

    Args:
        path: the file.
        reason: a short phrase for reports, e.g. ``"truncated"``.
        hint: how to fix it (defaults to a generic one).
    """

    def __init__(self, path: Path, reason: str, hint: str | None = None) -> None:
        super().__init__(
            f"{path}: {reason}",
            hint=hint or "re-export or remove the file; the scan skips it",
        )
        self.path = Path(path)
        self.reason = reason


def verify_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Decode ``path`` fully, exactly as training does (:func:`load_image_rgb`).

    Raises:
        BadImageError: the pixels cannot be decoded (a header that reads fine is not enough).
    """
    load_image_rgb(path, max_pixels).close()


def read_image_size(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The displayed ``(width, height)`` of an image, read from its header.

    Pixels are not decoded. The EXIF orientation is applied (orientations 5-8 swap the sides).
    Cheap structural checks catch files cut short (missing PNG ``IEND``, JPEG ``EOI``, RIFF or
    BMP size mismatch); a file that fails them is fully decoded once to decide, since some
    writers append trailers after the end marker.

    Args:
        path: the image file.
        max_pixels: images with more pixels are rejected as decompression bombs.

    Raises:
        BadImageError: empty, unreadable, not an image, truncated, or too large.
    """
    path = Path(path)
    plain = _plain_size(path)
    if plain is not None and 0 < plain[0] * plain[1] <= max_pixels:
        width, height, orientation = plain
    else:
        with _opened(path, max_pixels) as (img, file, file_size):
            width, height = img.size
            orientation = _exif_orientation(img)
            suspicious = _looks_truncated(file, file_size, img.format)
        if suspicious and not _decodes(path):
            raise BadImageError(path, "truncated (file ends before the image data does)")
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def _plain_size(path: Path) -> tuple[int, int, int] | None:
    """The header fast path (:mod:`loraforge.data.image_headers`); ``None``: use Pillow."""
    try:
        with path.open("rb") as file:
            return plain_header_size(file, os.fstat(file.fileno()).st_size, path.suffix.lower())
    except OSError:
        return None  # Pillow's path words the error


def load_image_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image as RGB, upright, with transparency composited on white.

    Args:
        path: the image file.
        max_pixels: images with more pixels are rejected as decompression bombs.

    Returns:
        A loaded ``PIL.Image`` in mode ``"RGB"`` with the EXIF orientation applied.

    Raises:
        BadImageError: empty, unreadable, not an image, truncated, or too large.
    """
    return load_image_and_alpha(path, max_pixels, alpha=False)[0]


def load_image_and_alpha(
    path: Path, max_pixels: int = MAX_IMAGE_PIXELS, *, alpha: bool = True
) -> tuple[Image.Image, Image.Image | None]:
    """Decode an image once: RGB as :func:`load_image_rgb` gives it, and its alpha channel.

    Args:
        path: the image file.
        max_pixels: images with more pixels are rejected as decompression bombs.
        alpha: also return the alpha channel (``False``: ``None`` in its place).

    Returns:
        ``(rgb, alpha)``: alpha is an upright mode ``"L"`` image (0 = transparent), or ``None``
        when the image has no transparency (fully opaque) or ``alpha`` is ``False``.

    Raises:
        BadImageError: empty, unreadable, not an image, truncated, or too large.
    """
    path = Path(path)
    with _opened(path, max_pixels) as (img, _, _):
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImageError(path, f"cannot be decoded ({_short(e)})") from e
        channel = upright.convert("RGBA").getchannel("A") if alpha and _has_alpha(upright) else None
        return _to_rgb(upright), channel


def has_transparency(path: Path) -> bool:
    """Whether an image has an alpha channel or palette transparency (header only; an
    unreadable file has none)."""
    try:
        with _opened(Path(path), MAX_IMAGE_PIXELS) as (img, _, _):
            return _has_alpha(img)
    except BadImageError:
        return False


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any alpha (RGBA, LA, PA, palette transparency) composited over white."""
    if not _has_alpha(img):
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit/float greyscale: scale to 8 bits instead of clipping everything to white.
            img = _high_depth_to_l(img)
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    import numpy as np

    array = np.asarray(img.convert("F") if img.mode != "F" else img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I") and array.max(initial=0) > 255 else 255.0
    scaled = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int) -> Iterator[tuple[Image.Image, BinaryIO, int]]:
    """Open ``path`` once: yield the (header-only) image, the file and its size.

    Every failure becomes a :class:`BadImageError` with a reason.
    """
    try:
        file = path.open("rb")
    except FileNotFoundError as e:
        raise BadImageError(path, "file not found") from e
    except PermissionError as e:
        raise BadImageError(path, "permission denied", hint=_PERMISSION_HINT) from e
    except OSError as e:
        raise BadImageError(path, f"cannot be read ({_short(e)})") from e
    with file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        img = _identify(path, file)
        try:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadImageError(path, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                raise BadImageError(
                    path,
                    f"too large ({width}x{height} = {width * height:,} pixels, "
                    f"limit {max_pixels:,})",
                    hint=_BOMB_HINT,
                )
            yield img, file, size
        finally:
            img.close()


def _identify(path: Path, file: BinaryIO) -> Image.Image:
    """``Image.open`` trying the extension's format first (most files are what they say)."""
    hint = _FORMAT_BY_EXTENSION.get(path.suffix.lower())
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if hint is not None:
                try:
                    return Image.open(file, formats=[hint])
                except UnidentifiedImageError:
                    file.seek(0)  # misnamed (a JPEG called .png): let Pillow try every format
            return Image.open(file)
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"too large ({_short(e)})", hint=_BOMB_HINT) from e
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not an image (Pillow cannot identify it)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"cannot be read ({_short(e)})") from e


_FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_PERMISSION_HINT = "fix the file's permissions (chmod a+r FILE)"
_BOMB_HINT = "downscale the image first; huge images are refused as possible decompression bombs"


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8), read without decoding pixels."""
    try:
        if img.format == "PNG":
            # PngImageFile.getexif() decodes the image to find a late eXIf chunk; only use an
            # eXIf chunk that precedes the pixel data (what Pillow read while opening).
            raw = img.info.get("exif")
            if raw is None:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # malformed EXIF must not make a readable image unusable
        return 1


def _looks_truncated(file: BinaryIO, size: int, fmt: str | None) -> bool:
    """Cheap end-of-file checks per format; ``True`` only means "decode to be sure"."""
    try:
        if fmt == "PNG":
            file.seek(max(0, size - 12))
            return b"IEND" not in file.read()
        if fmt in ("JPEG", "MPO"):
            file.seek(max(0, size - 2))
            return file.read() != b"\xff\xd9"
        if fmt == "WEBP":
            file.seek(4)
            return size < int.from_bytes(file.read(4), "little") + 8
        if fmt == "BMP":
            file.seek(2)
            declared = int.from_bytes(file.read(4), "little")
            return declared > 0 and size < declared
        if fmt == "GIF":
            file.seek(max(0, size - 1))
            return file.read() != b";"
    except OSError:
        return True
    return False


def _decodes(path: Path) -> bool:
    """Fully decode ``path`` (only for files that failed a structural check)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
        return True
    except Exception:
        return False


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
