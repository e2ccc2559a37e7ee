"""The presets shipped in ``recipes/``: each a commented, schema-valid recipe.

A preset file starts with header comments that ``init --list`` shows::

    # loraforge preset: char-12gb
    # purpose: character LoRA on SD 1.5
    # vram: 12 GB
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import RecipeError
from loraforge.resources import data_path

_HEADER = re.compile(r"^#\s*(purpose|vram|family):\s*(.+?)\s*$")
# Presets that write a whole project (tiny model + images + recipe) instead of one file.
PROJECT_PRESETS = ("demo", "demo-sdxl", "demo-flux", "demo-sd3")


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    family: str
    purpose: str
    vram: str


def _read_header(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER.match(line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers inside names by value: ``char-8gb`` before
    ``char-12gb``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)
    )


def list_presets() -> list[Preset]:
    """Every preset shipped with loraforge, in natural name order (``char-8gb`` before
    ``char-12gb``)."""
    presets = []
    paths = sorted(data_path("recipes").glob("*.yaml"), key=lambda path: natural_key(path.stem))
    for path in paths:
        header = _read_header(path)
        presets.append(
            Preset(
                path.stem,
                path,
                header.get("family", "?"),
                header.get("purpose", ""),
                header.get("vram", ""),
            )
        )
    return presets


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        RecipeError: no such preset (naming the ones that exist).
    """
    presets = {p.name: p for p in list_presets()}
    if name not in presets:
        import difflib

        close = difflib.get_close_matches(name, list(presets) + list(PROJECT_PRESETS), n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        raise RecipeError(
            f'no preset named "{name}"',
            hint=f"{hint}`loraforge init --list` shows them all",
        )
    return presets[name]
