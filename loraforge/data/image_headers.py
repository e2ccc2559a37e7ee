"""Image sizes straight from PNG and JPEG headers, for the common well-formed file.

Reading a size through ``PIL.Image.open`` costs about ten times what parsing the few header bytes
does, and a dataset scan reads thousands. :func:`plain_header_size` answers only for a file whose
structure is unremarkable: a PNG whose chunks up to the pixel data are intact and which ends with
``IEND``; a baseline or progressive JPEG that ends with ``EOI``. For anything else — another format,
a truncated file, an odd chunk, a malformed EXIF block — it returns ``None`` and the caller takes
the full Pillow path, which decides (and words the error). It never raises for a bad file.

Nothing here imports torch or Pillow.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

__all__ = ["plain_header_size"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> the bit depths the PNG specification allows for it
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_MAX_CHUNKS = 64  # ancillary chunks before IDAT; beyond this, let Pillow read the file
_PNG_MAX_CHUNK_BYTES = 1 << 20
# Chunks that may precede the pixel data of an ordinary PNG (eXIf is not one: it needs Pillow).
_PNG_PLAIN_CHUNKS = frozenset(
    b"IHDR PLTE tRNS gAMA cHRM sRGB iCCP sBIT pHYs bKGD tIME tEXt zTXt iTXt".split()
)

# Start-of-frame markers that carry the frame size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_SEGMENTS = 64
_EXIF_ORIENTATION_TAG = 0x0112


def plain_header_size(
    file: BinaryIO, file_size: int, extension: str
) -> tuple[int, int, int] | None:
    """``(width, height, exif_orientation)`` of a well-formed PNG or JPEG, else ``None``.

    Args:
        file: the image, opened in binary mode (its position is moved).
        file_size: its size in bytes.
        extension: the lower-case file extension; only ``.png`` and the JPEG ones are parsed.

    Returns:
        The stored (not yet rotated) size and the EXIF orientation (1 when there is none), or
        ``None`` when the file needs Pillow's judgement.
    """
    try:
        if extension == ".png":
            return _png(file, file_size)
        if extension in (".jpg", ".jpeg", ".jpe", ".jfif"):
            return _jpeg(file, file_size)
    except (OSError, struct.error, ValueError):
        return None
    return None


def _png(file: BinaryIO, file_size: int) -> tuple[int, int, int] | None:
    if file.read(8) != _PNG_SIGNATURE:
        return None
    size = None
    for _ in range(_PNG_MAX_CHUNKS):
        head = file.read(8)
        if len(head) < 8:
            return None
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IDAT":
            break
        if kind not in _PNG_PLAIN_CHUNKS or length > _PNG_MAX_CHUNK_BYTES:
            return None  # eXIf (an orientation to read) or anything unusual: Pillow decides
        data, crc = file.read(length), file.read(4)
        if len(crc) < 4 or zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
            return None  # cut short or damaged: Pillow words the error
        if kind == b"IHDR":
            size = _png_ihdr(data) if size is None else None
        if size is None:
            return None  # IHDR first, once, and valid
    else:
        return None
    file.seek(max(0, file_size - 12))
    if b"IEND" not in file.read():
        return None
    return size[0], size[1], 1


def _png_ihdr(data: bytes) -> tuple[int, int] | None:
    if len(data) != 13:
        return None
    width, height, depth, colour, compression, filter_, interlace = struct.unpack(">IIBBBBB", data)
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filter_ or interlace > 1:
        return None
    return width, height


def _jpeg(file: BinaryIO, file_size: int) -> tuple[int, int, int] | None:
    if file.read(2) != b"\xff\xd8":
        return None
    size, orientation, seen_exif = None, 1, False
    position = 2
    # Pillow reads every segment up to the start of scan; so does this (EXIF may follow SOF).
    for _ in range(_JPEG_MAX_SEGMENTS):
        file.seek(position)
        marker = file.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        kind, length = marker[1], struct.unpack(">H", marker[2:])[0]
        if length < 2 or position + 2 + length > file_size:
            return None
        if kind == 0xDA:
            break
        if kind in _JPEG_SOF:
            frame = file.read(5)
            if size is not None or len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:])
            size = (width, height)
        elif kind == 0xE1 and not seen_exif:
            segment = file.read(length - 2)
            seen_exif = segment.startswith(b"Exif\x00\x00")  # the first EXIF block counts
            found = _exif_orientation(segment)
            if found is None:
                return None
            orientation = found
        elif not (0xE0 <= kind <= 0xEF or kind in (0xDB, 0xC4, 0xDD, 0xFE)):
            return None  # a marker an ordinary header does not hold: let Pillow judge
        position += 2 + length
    else:
        return None
    if size is None:
        return None
    file.seek(max(0, file_size - 2))
    if file.read() != b"\xff\xd9":
        return None
    return size[0], size[1], orientation


def _exif_orientation(segment: bytes) -> int | None:
    """The orientation in an APP1 segment: 1 when it is not EXIF or has none; ``None`` when the
    EXIF block is malformed (then Pillow reads it)."""
    if not segment.startswith(b"Exif\x00\x00"):
        return 1  # XMP or another APP1 payload
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    if offset + 2 > len(tiff):
        return None
    (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    for i in range(count):
        start = offset + 2 + 12 * i
        entry = tiff[start : start + 12]
        if len(entry) < 12:
            return None
        tag, kind, _, value = struct.unpack(order + "HHI2s2x", entry)
        if tag == _EXIF_ORIENTATION_TAG:
            if kind != 3:  # SHORT
                return None
            (found,) = struct.unpack(order + "H", value)
            return found if 1 <= found <= 8 else 1
    return 1
