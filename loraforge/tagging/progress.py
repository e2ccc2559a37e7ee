"""A rich progress bar for tagging: done/total, images per second, elapsed and remaining time."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ImagesPerSecondColumn(ProgressColumn):
    """``12.3 img/s`` from rich's moving speed estimate (blank until there is one)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("-- img/s", style="progress.data.speed")
        return Text(f"{speed:.1f} img/s", style="progress.data.speed")


def tagging_progress(console: Console, enabled: bool = True) -> Progress:
    """A :class:`~rich.progress.Progress` on ``console`` (stderr), silent when not ``enabled``."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecondColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
