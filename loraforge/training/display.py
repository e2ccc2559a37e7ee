"""What a run shows and logs: a rich live line on stderr and, when asked, TensorBoard scalars.

The live line: step/total, epoch, loss (current and moving average over the last epoch's steps),
it/s, ETA, learning rates, peak device memory, and max-norm figures when ``scale_weight_norms``
is set. On a terminal it updates in place; otherwise (CI logs, files) a plain line is printed
about every tenth of the run. Only the main process shows or logs anything.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
    resident memory on a CPU, as text."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    try:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{peak_kib / 2**20:.1f} GiB RAM"
    except (ImportError, OSError):
        return "n/a"


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

    def epoch(self, epoch: int, average: float) -> None:
        self.writer.add_scalar("loss/epoch", average, epoch)

    def images(self, step: int, images: Sequence[tuple[str, Any]]) -> None:
        import numpy as np

        for tag, image in images:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class TrainingDisplay:
    """The live progress line (rank 0) plus the optional TensorBoard log.

    Args:
        console: the stderr console.
        total_steps, num_epochs: the run's length.
        start_step: steps already done (a resumed run).
        device: for the peak memory figure.
        enabled: show anything at all (False on other ranks).
        tensorboard: a :class:`TensorBoardLog` or ``None``.
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
    ) -> None:
        self.console = console
        self.total = total_steps
        self.num_epochs = num_epochs
        self.start_step = start_step
        self.device = device
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.live = enabled and console.is_terminal
        self.every = max(1, total_steps // 10)
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} (avg {task.fields[avg]})"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("lr {task.fields[lr]}  peak {task.fields[mem]} {task.fields[norm]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task(
            "train",
            total=total_steps,
            completed=start_step,
            epoch="-",
            loss="-",
            avg="-",
            rate="",
            lr="-",
            mem="-",
            norm="",
        )

    def __enter__(self) -> TrainingDisplay:
        self.started = time.perf_counter()
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _rate(self, step: int) -> str:
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        return f"{done / elapsed:.2f} it/s" if elapsed > 0 and done > 0 else ""

    def step(self, report: StepReport) -> None:
        """Show (and log) one optimizer step."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.step(report)
        fields = {
            "epoch": f"{report.epoch}/{self.num_epochs}",
            "loss": f"{report.loss:.4f}",
            "avg": f"{report.average:.4f}",
            "rate": self._rate(report.step),
            "lr": _lr_text(report.lrs),
            "mem": peak_memory(self.device),
            "norm": _max_norm_text(report.max_norm),
        }
        self.progress.update(self.task, completed=report.step, **fields)
        if not self.live and (report.step % self.every == 0 or report.step == self.total):
            self.console.print(
                f"step {report.step}/{self.total} epoch {fields['epoch']} loss {fields['loss']} "
                f"(avg {fields['avg']}) {fields['rate']} lr {fields['lr']} peak {fields['mem']} "
                f"{fields['norm']}".rstrip(),
                soft_wrap=True,
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
