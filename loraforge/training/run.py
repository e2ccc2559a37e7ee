"""A whole training run: set-up -> train -> clean-up, with Ctrl-C turned into a saved state.

The first Ctrl-C asks the loop to stop after the current optimizer step and write a resumable
``<name>-state`` folder; a second one aborts at once with :class:`TrainingAborted`, which says
what was kept (files already saved are; a file being written is not, as writes are atomic).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.console import err
from loraforge.recipe import Recipe
from loraforge.training.loop import StopFlag, TrainResult


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C stopped the run at once.

    Attributes:
        step: the last optimizer step done.
        kept: the newest LoRA file and state folder this run saved, by kind, with their step
            (see :attr:`loraforge.training.saving.Checkpointer.kept`).
        main_process: this process is the one that writes files and reports.
    """

    def __init__(self, step: int, kept: dict[str, tuple[int, Path]], main_process: bool) -> None:
        super().__init__(f"aborted at step {step}")
        self.step = step
        self.kept = kept
        self.main_process = main_process


@contextlib.contextmanager
def ctrl_c_stops(flag: StopFlag, on_first: Any = None) -> Iterator[StopFlag]:
    """Install a SIGINT handler: the first signal sets ``flag``, the second raises
    ``KeyboardInterrupt``. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.requested = True
        if on_first is not None:
            on_first()

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def make_display(run: Any) -> Any:
    """The live display of a run (silent on other ranks), with TensorBoard when asked."""
    from loraforge.training.display import TensorBoardLog, TrainingDisplay

    output = run.settings.output
    tensorboard = None
    if output.log_with == "tensorboard" and run.is_main:
        tensorboard = TensorBoardLog(output.log_dir, output.name)
    length = run.settings.length
    return TrainingDisplay(
        err,
        total_steps=length.max_train_steps,
        num_epochs=length.num_epochs,
        start_step=run.start.global_step,
        device=run.device,
        enabled=run.is_main,
        tensorboard=tensorboard,
    )


def run_training(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
) -> TrainResult:
    """Train the recipe's LoRA; see :func:`loraforge.training.setup.setup_run` for the options.

    Returns:
        How the run ended (the final file, or the state folder after Ctrl-C).

    Raises:
        LoraforgeError: user errors during set-up; TrainingError for a non-finite loss, or
            another run holding the output folder.
        TrainingAborted: a second Ctrl-C.
    """
    import os

    from loraforge.training.lock import hold_output_folder

    # one run per output folder; only the process that writes files (rank 0) holds it
    main_process = os.environ.get("RANK", "0") == "0"
    with hold_output_folder(Path(recipe.output.dir), recipe.output.name, enabled=main_process):
        return _run(recipe, resume, force, threads)


def _run(
    recipe: Recipe, resume: str | Path | None, force: bool, threads: int | None
) -> TrainResult:
    from loraforge.training.distributed import wait_for_everyone
    from loraforge.training.loop import train
    from loraforge.training.setup import setup_run

    run = setup_run(recipe, resume=resume, force=force, threads=threads)
    flag = StopFlag()
    display = make_display(run)

    def announce() -> None:
        display.message(
            "stopping after this step and saving a resumable state "
            "(Ctrl-C again aborts at once, keeping only what was saved before)"
        )

    try:
        with ctrl_c_stops(flag, announce), display:
            result = train(run, display, flag)
        wait_for_everyone(run.num_processes)
    except KeyboardInterrupt as e:
        raise TrainingAborted(display.last_step, dict(run.checkpointer.kept), run.is_main) from e
    finally:
        release(run)
    return result


def release(run: Any) -> None:
    """Shut down loader workers and free the device memory of the run."""
    iterator = getattr(run.loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if run.device.type == "cuda":
        run.accelerator.free_memory()
