"""Memory sizes as people write them (``12GB``, ``11.5 GiB``, ``8000MB``) and back."""

from __future__ import annotations

import re
from pathlib import Path

from loraforge.errors import LoraforgeError

# GPU memory is sold in binary units: a "12 GB" card has 12 GiB, so GB means GiB here.
_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 2**40,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in a size like ``12GB``, ``11.5 GiB``, ``8000MB`` or a plain byte count.

    GB, G and GiB all mean 2**30 bytes (GPU memory is sold in binary units); likewise
    KB/MB/TB. Case does not matter.

    Raises:
        LoraforgeError: not a size (the message shows the accepted forms).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise LoraforgeError(f"size must not be negative, got {text}")
        return int(text)
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise LoraforgeError(
            f"not a memory size: {text!r}",
            hint="write a number with a unit, e.g. 12GB, 11.5GiB or 8000MB",
        )
    return round(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``11.73 GiB``, ``512.0 MiB``, ``3.2 KiB``, ``12 B``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            digits = 2 if unit == "GiB" else 1
            return f"{sign}{n / size:.{digits}f} {unit}"
    return f"{sign}{int(n)} B"


_HEADER_VRAM = re.compile(r"^#\s*vram:\s*(.+?)\s*$")


def header_budget(path: str | Path) -> int | None:
    """The budget a recipe file names in its leading comments (``# vram: 12 GB``), if any.

    Presets carry such a line; ``check --budget header`` can gate each file by its own card.

    Raises:
        LoraforgeError: the line is there but its value is not a size.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            match = _HEADER_VRAM.match(line.strip())
            if match:
                return parse_size(match.group(1))
    return None
