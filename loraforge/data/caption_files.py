"""Reading caption files next to images (``photo.png`` -> ``photo.txt``), like sd-scripts.

Captions are UTF-8; a UTF-8 BOM is dropped and UTF-16 with a BOM (what Windows Notepad writes as
"Unicode") is decoded. Any other encoding is reported, never crashed on: the image then falls back
to its class tokens, as if the caption file were missing.

What is kept from the file (sd-scripts ``read_caption``): the first line, stripped; with wildcards
enabled, every non-blank line, stripped, joined by newlines (one line is drawn per step).
"""

from __future__ import annotations

import codecs
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaptionFile:
    """The outcome of looking for an image's caption file.

    Attributes:
        text: the caption, or ``None`` when there is no usable file.
        path: the caption file looked for.
        problem: why an existing file could not be used (``None`` when fine or absent).
    """

    text: str | None
    path: Path
    problem: str | None = None


def caption_path(image: Path, extension: str) -> Path:
    """``dir/name.png`` + ``".txt"`` -> ``dir/name.txt`` (a missing leading dot is added)."""
    if extension and not extension.startswith("."):
        extension = "." + extension
    return image.with_name(image.stem + extension)


def read_caption(
    image: Path,
    extension: str,
    enable_wildcard: bool = False,
    folder_names: Container[str] | None = None,
) -> CaptionFile:
    """Read the caption file of ``image``.

    Args:
        image: the image file.
        extension: caption extension (``".txt"``, ``".caption"``; the dot is optional).
        enable_wildcard: keep all non-blank lines (joined by ``\\n``) instead of the first.
        folder_names: the lower-cased names in the image's folder, when the caller listed it
            already; a caption absent from it is not looked up (saves a failed open per image;
            lower case so that case-insensitive file systems still find ``A.TXT``).

    Returns:
        A :class:`CaptionFile`; never raises for a bad or unreadable file (see ``problem``).
    """
    path = caption_path(image, extension)
    if folder_names is not None and path.name.lower() not in folder_names:
        return CaptionFile(None, path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return CaptionFile(None, path)
    except IsADirectoryError:
        return CaptionFile(None, path, "is a folder, not a caption file")
    except OSError as e:
        return CaptionFile(None, path, f"cannot be read ({e.strerror or e})")
    try:
        text = decode_caption_bytes(raw)
    except UnicodeDecodeError as e:
        return CaptionFile(
            None,
            path,
            f"not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save it as UTF-8",
        )
    # Line breaks as Python's text mode reads them (\n, \r\n, \r), nothing more exotic.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if enable_wildcard:
        return CaptionFile("\n".join(s for line in lines if (s := line.strip())), path)
    return CaptionFile(lines[0].strip(), path)


def decode_caption_bytes(raw: bytes) -> str:
    """Decode caption bytes: UTF-8 (BOM dropped) or UTF-16 with a BOM.

    Raises:
        UnicodeDecodeError: anything else.
    """
    if raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8) :].decode("utf-8")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8")
