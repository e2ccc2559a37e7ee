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
PROJECT_PRESETS = ("demo", "demo-sdxl")


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


def list_presets() -> list[Preset]:
    """Every preset shipped with loraforge, sorted by name."""
    presets = []
    for path in sorted(data_path("recipes").glob("*.yaml")):
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
