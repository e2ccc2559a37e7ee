"""The sample grid: every sample of a run so far in one PNG, prompts down, sampling points across.

Rewritten after each sampling round from the sample files on disk (so a resumed run's grid still
shows the rounds before the interruption). Cells are scaled up by a whole factor to at least
128 pixels, so the tiny demo's 64-pixel samples can be seen; a point whose file is missing is
left grey.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraforge.training.output_plan import SaveKind, grid_file_name, sample_file_name
from loraforge.training.settings import SampleSpec

MIN_CELL = 128
_LABEL_WIDTH = 168
_HEADER = 18
_PAD = 4
_BACKGROUND = (255, 255, 255)
_EMPTY = (200, 200, 200)
_TEXT = (0, 0, 0)


def point_label(kind: SaveKind, number: int) -> str:
    """``step 80`` or ``epoch 2``."""
    return f"{kind} {number}"


def write_sample_grid(
    folder: Path, name: str, specs: Sequence[SampleSpec], points: Sequence[tuple[SaveKind, int]]
) -> Path | None:
    """Write ``<name>_grid.png`` in ``folder`` from the sample PNGs of ``points``.

    Args:
        folder: the sample folder.
        name: ``output.name``.
        specs: the prompts (rows).
        points: ``(kind, number)`` of each sampling point so far (columns), in order.

    Returns:
        The grid's path, or ``None`` when there is nothing to show.
    """
    from PIL import Image, ImageDraw

    from loraforge.training.sampling import save_png

    if not specs or not points:
        return None
    cells: list[list[Any]] = []
    for spec in specs:
        row = []
        for kind, number in points:
            path = folder / sample_file_name(name, kind, number, spec.index, spec.seed)
            row.append(_open(path))
        cells.append(row)
    width = max(spec.width for spec in specs)
    height = max(spec.height for spec in specs)
    scale = max(1, -(-MIN_CELL // min(width, height)))
    cell_w, cell_h = width * scale, height * scale
    grid = Image.new(
        "RGB",
        (_LABEL_WIDTH + len(points) * (cell_w + _PAD), _HEADER + len(specs) * (cell_h + _PAD)),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(grid)
    for col, (kind, number) in enumerate(points):
        draw.text((_LABEL_WIDTH + col * (cell_w + _PAD), 3), point_label(kind, number), fill=_TEXT)
    for row, spec in enumerate(specs):
        top = _HEADER + row * (cell_h + _PAD)
        lines = textwrap.wrap(spec.prompt, width=26)[: max(1, cell_h // 12)]
        draw.multiline_text((_PAD, top + 2), "\n".join(lines), fill=_TEXT, spacing=2)
        for col, image in enumerate(cells[row]):
            left = _LABEL_WIDTH + col * (cell_w + _PAD)
            if image is None:
                draw.rectangle([left, top, left + cell_w - 1, top + cell_h - 1], fill=_EMPTY)
                continue
            scaled = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(scaled, (left, top))
    return save_png(grid, folder / grid_file_name(name))


def _open(path: Path) -> Any:
    from PIL import Image

    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.convert("RGB")
