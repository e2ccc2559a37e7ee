"""The `demo` and `demo-sdxl` projects: a built-in tiny model, generated images and a recipe."""

from __future__ import annotations

from pathlib import Path

from loraforge.commands._pending import NotAvailableYet


def write_demo_project(preset: str, directory: Path, *, force: bool) -> Path:
    raise NotAvailableYet(
        f"the {preset} project needs the training capability (issue 5), which has not landed yet",
        hint="use a preset such as char-12gb for now",
    )
