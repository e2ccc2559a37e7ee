"""What a run shows and logs: a rich live display on stderr and, when asked, TensorBoard scalars.

The live display, laid out by priority for the terminal's width (:func:`status_lines`): step/total,
ETA, loss (current and moving average over the last epoch's steps) and speed first, then the
epoch and a progress bar when there is room; peak device memory, learning rates and max-norm
figures (with ``scale_weight_norms``) on a second line, each shown whole or dropped when narrow;
the newest validation loss and the best so far (with held-out images) after the loss.
The ETA comes from the run's own average step time and counts down between steps. On a terminal
the display updates in place; otherwise (CI logs, files) a plain line is printed about every
tenth of the run. Only the main process shows or logs anything.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from loraforge.backends.base import MaxNormResult
from loraforge.errors import DependencyError


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step reports.

    Attributes:
        step: global step after the update (1-based).
        epoch: 1-based epoch in progress.
        loss: the step's loss (mean over its batches and processes).
        average: moving average of the loss.
        lrs: learning rate per parameter group.
        max_norm: max-norm result, when enabled.
    """

    step: int
    epoch: int
    loss: float
    average: float
    lrs: Mapping[str, float]
    max_norm: MaxNormResult | None = None


@dataclass(frozen=True)
class ValidationReport:
    """One validation: its loss and the best so far (``best_step`` the step that had it)."""

    step: int
    loss: float
    best: float | None
    best_step: int | None


class LossWindow:
    """Moving average of the last ``size`` step losses (sd-scripts averages over an epoch)."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        self.values: deque[float] = deque(values, maxlen=max(1, size))

    def add(self, loss: float) -> float:
        self.values.append(loss)
        return self.average

    @property
    def average(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


def peak_memory(device: Any) -> str:
    """Peak memory of the device (``torch.cuda.max_memory_allocated``), or the process's peak
    resident memory on a CPU, as text (see :func:`loraforge.training.metrics.peak_memory_bytes`)."""
    from loraforge.training.metrics import peak_memory_bytes

    peak = peak_memory_bytes(device)
    if peak is None:
        return "n/a"
    where = "" if getattr(device, "type", "cpu") == "cuda" else " RAM"
    return f"{peak / 2**30:.1f} GiB{where}"


def _lr_text(lrs: Mapping[str, float]) -> str:
    return " ".join(f"{name}={lr:.2e}" for name, lr in lrs.items()) or "-"


def _max_norm_text(result: MaxNormResult | None) -> str:
    if result is None:
        return ""
    return f"keys scaled {result.keys_scaled}, avg key norm {result.mean_norm:.4f}"


class TensorBoardLog:
    """TensorBoard scalars and images under ``log_dir/<name>_<time>`` (sd-scripts' tags).

    Raises:
        DependencyError: tensorboard is not installed.
    """

    def __init__(self, log_dir: Path, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise DependencyError(
                "logging.log_with tensorboard needs the tensorboard package, which is not installed",
                hint="pip install 'loraforge[logging]' (or pip install tensorboard), "
                "or set logging.log_with: none",
            ) from e
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.writer = SummaryWriter(log_dir=str(Path(log_dir) / f"{run_name}_{stamp}"))

    def step(self, report: StepReport) -> None:
        w = self.writer
        w.add_scalar("loss/current", report.loss, report.step)
        w.add_scalar("loss/average", report.average, report.step)
        for name, lr in report.lrs.items():
            w.add_scalar(f"lr/{name.replace(' ', '_')}", lr, report.step)
        if report.max_norm is not None:
            w.add_scalar("max_norm/keys_scaled", report.max_norm.keys_scaled, report.step)
            w.add_scalar("max_norm/average_key_norm", report.max_norm.mean_norm, report.step)
            w.add_scalar("max_norm/max_key_norm", report.max_norm.max_norm, report.step)

    def validation(self, report: ValidationReport) -> None:
        self.writer.add_scalar("loss/validation", report.loss, report.step)

    def epoch(self, epoch: int, average: float) -> None:
        self.writer.add_scalar("loss/epoch", average, epoch)

    def images(self, step: int, images: Sequence[tuple[str, Any]]) -> None:
        import numpy as np

        for tag, image in images:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class StatusFields:
    """What the live display shows, as text, most important first.

    Attributes:
        step, total: optimizer steps done and planned.
        eta: time left (``H:MM:SS``), ``""`` before the first step.
        loss, average: the last step's loss and the moving average.
        rate: ``2.31 it/s`` (or ``4.2 s/it`` when slower than one step a second).
        epoch: ``3/10``.
        memory: peak device memory.
        lrs: the learning rate of every parameter group.
        norm: max-norm figures, ``""`` when off.
        validation: the newest validation loss and the best, ``""`` before the first.
    """

    step: int
    total: int
    eta: str = ""
    loss: str = "-"
    average: str = "-"
    rate: str = ""
    epoch: str = "-"
    memory: str = ""
    lrs: str = ""
    norm: str = ""
    validation: str = ""

    def first_line(self) -> list[str]:
        """The figures a glance needs, in priority order."""
        return [
            f"step {self.step}/{self.total}",
            f"eta {self.eta or '…'}",
            f"loss {self.loss} (avg {self.average})",
            self.validation,
            self.rate,
            f"epoch {self.epoch}",
        ]

    def second_line(self) -> list[str]:
        return [
            f"peak {self.memory}" if self.memory else "",
            f"lr {self.lrs}" if self.lrs else "",
            self.norm,
        ]


_GAP = "  "
_MIN_BAR = 10


def _fit(parts: Sequence[str], width: int) -> str:
    """``parts`` joined while they fit ``width``, in order; the first part that does not fit and
    everything after it are dropped (never cut in the middle)."""
    line = ""
    for part in (p for p in parts if p):
        candidate = f"{line}{_GAP}{part}" if line else part
        if len(candidate) > width:
            break
        line = candidate
    return line


def status_lines(fields: StatusFields, width: int) -> list[Text]:
    """The live display at ``width`` columns, laid out by priority: step/total, ETA, loss
    (average) and speed first (on one line, with the epoch and a progress bar when there is
    room); peak memory, learning rates and max-norm figures on a second line, each shown whole
    or dropped."""
    first = _fit(fields.first_line(), width)
    line = Text(first)
    room = width - len(first) - len(_GAP)
    if room >= _MIN_BAR and fields.total > 0:
        done = round(room * min(fields.step, fields.total) / fields.total)
        line.append(_GAP)
        line.append("━" * done, style="bar.complete")
        line.append("━" * (room - done), style="bar.back")
    lines = [line]
    second = _fit(fields.second_line(), width)
    if second:
        lines.append(Text(second, style="dim"))
    return lines


def format_eta(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_rate(steps: int, seconds: float) -> str:
    """``2.31 it/s``, or ``4.2 s/it`` for slow steps; ``""`` before there is a rate."""
    if steps <= 0 or seconds <= 0:
        return ""
    rate = steps / seconds
    return f"{rate:.2f} it/s" if rate >= 1 else f"{seconds / steps:.1f} s/it"


class _LiveStatus:
    """The renderable the live display redraws: laid out for the console's width at each
    refresh, with the ETA counting down between steps."""

    def __init__(self, display: TrainingDisplay) -> None:
        self.display = display

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from status_lines(self.display.fields(), options.max_width)


class TrainingDisplay:
    """The live progress display (rank 0) plus the optional TensorBoard log.

    Args:
        console: the stderr console.
        total_steps, num_epochs: the run's length.
        start_step: steps already done (a resumed run).
        device: for the peak memory figure.
        enabled: show anything at all (False on other ranks).
        tensorboard: a :class:`TensorBoardLog` or ``None``.
        clock: seconds, for the rate and the ETA (tests pass a fake one).
    """

    def __init__(
        self,
        console: Console,
        *,
        total_steps: int,
        num_epochs: int,
        start_step: int,
        device: Any,
        enabled: bool = True,
        tensorboard: TensorBoardLog | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console
        self.total = total_steps
        self.num_epochs = num_epochs
        self.start_step = start_step
        self.device = device
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.clock = clock
        self.live = enabled and console.is_terminal
        self.every = max(1, total_steps // 10)
        self.started = clock()
        self.last_step = start_step
        self.last_step_at = self.started
        self.shown = StatusFields(start_step, total_steps)
        self._live = Live(_LiveStatus(self), console=console, refresh_per_second=2, transient=False)

    def __enter__(self) -> TrainingDisplay:
        self.started = self.last_step_at = self.clock()
        if self.live:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._live.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def fields(self) -> StatusFields:
        """What to show now: the last step's figures, the ETA counted down since it."""
        done = self.last_step - self.start_step
        if done <= 0:
            return self.shown
        per_step = (self.last_step_at - self.started) / done
        since = self.clock() - self.last_step_at
        left = (self.total - self.last_step) * per_step - since
        return replace(self.shown, eta=format_eta(left))

    def step(self, report: StepReport) -> None:
        """Show (and log) one optimizer step."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.step(report)
        self.last_step, self.last_step_at = report.step, self.clock()
        self.shown = StatusFields(
            validation=self.shown.validation,
            step=report.step,
            total=self.total,
            loss=f"{report.loss:.4f}",
            average=f"{report.average:.4f}",
            rate=format_rate(report.step - self.start_step, self.last_step_at - self.started),
            epoch=f"{report.epoch}/{self.num_epochs}",
            memory=peak_memory(self.device),
            lrs=_lr_text(report.lrs),
            norm=_max_norm_text(report.max_norm),
        )
        if self.live:
            self._live.refresh()
        elif report.step % self.every == 0 or report.step == self.total:
            fields = self.fields()
            parts = [*fields.first_line(), *fields.second_line()]
            self.console.print(_GAP.join(p for p in parts if p), soft_wrap=True, markup=False)

    def validation(self, report: ValidationReport) -> None:
        """Show (and log) a validation loss."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.validation(report)
        best = f" (best {report.best:.4f} @ {report.best_step})" if report.best is not None else ""
        self.shown = replace(self.shown, validation=f"val {report.loss:.4f}{best}")
        if self.live:
            self._live.refresh()
        else:
            self.console.print(
                f"step {report.step}: validation loss {report.loss:.6f}{best}", soft_wrap=True
            )

    def epoch_done(self, epoch: int, average: float) -> None:
        if self.enabled and self.tensorboard is not None:
            self.tensorboard.epoch(epoch, average)

    def images(self, step: int, images: Sequence[tuple[str, Any]]) -> None:
        if self.enabled and self.tensorboard is not None:
            self.tensorboard.images(step, images)

    def message(self, text: str) -> None:
        """A log line above the live display."""
        if self.enabled:
            self.console.print(text, soft_wrap=True)
