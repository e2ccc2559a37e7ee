"""The live training display: laid out by priority at any width, an ETA that does not flicker."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loraforge.training.display import StatusFields, StepReport, TrainingDisplay, status_lines

LRS = {"unet": 1e-4, "text_encoder": 5e-5, "unet block 3": 2.5e-5, "unet block 7": 7.5e-6}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rendered(display: TrainingDisplay, width: int) -> list[str]:
    """The live display as a terminal of ``width`` columns shows it."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    for line in status_lines(display.fields(), width):
        console.print(line)
    return console.file.getvalue().splitlines()


def running_display(clock: FakeClock) -> TrainingDisplay:
    """A 1600-step run at step 37, 2 s per step."""
    console = Console(file=io.StringIO(), width=80)
    display = TrainingDisplay(
        console, total_steps=1600, num_epochs=10, start_step=0, device=None, clock=clock
    )
    with display:
        for step in range(1, 38):
            clock.now += 2.0
            display.step(StepReport(step, 1, 0.1234, 0.1301, LRS))
    return display


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_step_eta_loss_and_speed_are_always_whole(width: int) -> None:
    lines = rendered(running_display(FakeClock()), width)
    assert all(len(line) <= width for line in lines)
    first = lines[0]
    # 1563 steps left at 2 s each
    for part in ("step 37/1600", "eta 0:52:06", "loss 0.1234 (avg 0.1301)", "2.0 s/it"):
        assert part in first, (width, first)
    assert first.index("step") < first.index("eta") < first.index("loss") < first.index("s/it")


@pytest.mark.parametrize("width", [80, 120, 200])
def test_learning_rates_and_memory_are_whole_or_left_out(width: int) -> None:
    lines = rendered(running_display(FakeClock()), width)
    lrs = "lr unet=1.00e-04 text_encoder=5.00e-05 unet block 3=2.50e-05 unet block 7=7.50e-06"
    text = "\n".join(lines)
    assert lrs in text or "lr " not in text  # never cut in the middle
    if width >= 120:
        assert lines[1].strip().endswith(lrs)  # on the second line when it fits
    if width == 200:
        assert "epoch 1/10" in lines[0] and "━" in lines[0]  # room for the epoch and a bar


def test_narrow_terminals_drop_the_least_important_first() -> None:
    fields = StatusFields(
        step=37, total=1600, eta="0:52:06", loss="0.1234", average="0.1301", rate="0.5 it/s",
        epoch="1/10", memory="1.2 GiB", lrs="unet=1.00e-04",
    )  # fmt: skip
    first = str(status_lines(fields, 40)[0])
    assert first.startswith("step 37/1600  eta 0:52:06  ━") and "loss" not in first
    assert len(first) == 40
    assert [str(t) for t in status_lines(fields, 20)] == ["step 37/1600", "peak 1.2 GiB"]


def test_the_eta_counts_down_between_steps_and_never_goes_blank() -> None:
    clock = FakeClock()
    display = running_display(clock)
    shown = []
    for _ in range(8):  # the display refreshes twice a second while a slow step runs
        clock.now += 0.5
        shown.append(display.fields().eta)
    assert shown[0] == "0:52:06" and shown[-1] == "0:52:02"
    assert "" not in shown and all("-" not in eta for eta in shown)
    clock.now += 10_000  # far past the estimate: 0, not negative or blank
    assert display.fields().eta == "0:00:00"


def test_logs_get_one_plain_line_with_every_figure() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    clock = FakeClock()
    display = TrainingDisplay(
        console, total_steps=10, num_epochs=1, start_step=0, device=None, clock=clock
    )
    with display:
        for step in range(1, 11):
            clock.now += 0.25
            display.step(StepReport(step, 1, 0.5, 0.5, {"unet": 1e-4}))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 10  # every tenth of the run (here every step), never wrapped
    assert lines[-1].startswith("step 10/10  eta 0:00:00  loss 0.5000 (avg 0.5000)  4.00 it/s")
    assert lines[-1].endswith("lr unet=1.00e-04")


def test_before_the_first_step_there_is_nothing_to_guess() -> None:
    console = Console(file=io.StringIO(), width=80)
    display = TrainingDisplay(
        console, total_steps=160, num_epochs=1, start_step=0, device=None, clock=FakeClock()
    )
    lines = [str(line) for line in status_lines(display.fields(), 80)]
    assert lines[0].startswith("step 0/160  eta …  loss - (avg -)")
    assert len(lines) == 1  # no empty memory or learning-rate labels


def test_the_validation_loss_is_shown_after_the_loss_and_logged(tmp_path) -> None:
    from loraforge.training.display import TensorBoardLog, ValidationReport

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    clock = FakeClock()
    board = TensorBoardLog(tmp_path / "logs", "run")
    display = TrainingDisplay(
        console, total_steps=10, num_epochs=1, start_step=0, device=None, clock=clock,
        tensorboard=board,
    )  # fmt: skip
    with display:
        for step in range(1, 11):
            clock.now += 0.25
            display.step(StepReport(step, 1, 0.5, 0.5, {"unet": 1e-4}))
            if step % 5 == 0:
                display.validation(ValidationReport(step, 0.3 - step / 100, 0.25, 5))
    lines = console.file.getvalue().splitlines()
    assert "step 5: validation loss 0.250000 (best 0.2500 @ 5)" in lines
    # the next step's line, and the live status, keep the newest validation loss
    assert "loss 0.5000 (avg 0.5000)  val 0.2500 (best 0.2500 @ 5)" in lines[-2]
    assert "loss 0.5000 (avg 0.5000)  val 0.2000 (best 0.2500 @ 5)" in rendered(display, 120)[0]
    (run_dir,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [(e.step, round(e.value, 6)) for e in events.Scalars("loss/validation")]
    assert logged == [(5, 0.25), (10, 0.2)]
