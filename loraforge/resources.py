"""Locate the data files that ship with loraforge (schema, presets, model configs).

In a wheel they live under ``loraforge/_data/``; in a source checkout they are the top-level
``schema/`` and ``recipes/`` folders. Both layouts are looked up, the installed one first.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    """Return the path of a shipped data file or folder, e.g. ``data_path("schema", "recipe.schema.json")``.

    Raises:
        FileNotFoundError: when neither the installed nor the source layout has it (a broken install).
    """
    for root in (_PACKAGE_DIR / "_data", _PACKAGE_DIR.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"loraforge data file missing: {'/'.join(parts)} (reinstall loraforge)")
