"""One progress-bar style for long jobs (caching, tagging): done/total, items/s, elapsed, ETA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class ItemsPerSecondColumn(ProgressColumn):
    """``12.3 img/s`` from rich's moving speed estimate (``--`` until there is one)."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = "--" if speed is None else f"{speed:.1f}"
        return Text(f"{text} {self.unit}/s", style="progress.data.speed")


def make_progress(console: Console, enabled: bool = True, unit: str = "img") -> Progress:
    """A :class:`~rich.progress.Progress` on ``console`` (stderr); silent when not ``enabled``."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ItemsPerSecondColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


@contextmanager
def progress_callback(
    console: Console, description: str, *, enabled: bool = True, unit: str = "img"
) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``(done, total)`` callback that drives one progress bar."""
    with make_progress(console, enabled, unit) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
