"""A finding about a recipe: an error or a warning, with the place it refers to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding. ``path`` is the dotted field path (``dataset.subsets[0].dir``); line/column are 1-based."""

    severity: Severity
    message: str
    path: str = ""
    file: str | None = None
    line: int | None = None
    column: int | None = None
    hint: str | None = None

    @property
    def location(self) -> str:
        parts = [self.file or "<recipe>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{self.location}: {where}{self.message}"
        return text if self.hint is None else f"{text} ({self.hint})"

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


#: the hint for a path in a recipe that does not exist
FIX_PATH_HINT = "fix the path (relative paths are relative to the recipe file)"


def parse_path(text: str) -> tuple[str | int, ...]:
    """``dataset.subsets[0].dir`` -> ``("dataset", "subsets", 0, "dir")`` (inverse of format_path)."""
    parts: list[str | int] = []
    for piece in text.split(".") if text else []:
        name, *indices = piece.split("[")
        if name:
            parts.append(name)
        parts += [int(index.rstrip("]")) for index in indices]
    return tuple(parts)


def format_path(parts: tuple[object, ...] | list[object]) -> str:
    """``("dataset", "subsets", 0, "dir")`` -> ``dataset.subsets[0].dir``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text
