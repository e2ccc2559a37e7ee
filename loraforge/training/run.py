"""A whole training run: set-up -> train -> clean-up, with Ctrl-C turned into a saved state.

The first Ctrl-C asks the loop to stop after the current optimizer step and write a resumable
``<name>-state`` folder; a second one aborts at once (files already saved are kept).
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
    recipe: Recipe, *, resume: str | Path | None = None, force: bool = False
) -> TrainResult:
    """Train the recipe's LoRA; see :func:`loraforge.training.setup.setup_run` for the options.

    Returns:
        How the run ended (the final file, or the state folder after Ctrl-C).

    Raises:
        LoraforgeError: user errors during set-up; TrainingError for a non-finite loss, or
            another run holding the output folder.
        KeyboardInterrupt: a second Ctrl-C.
    """
    import os

    from loraforge.training.lock import hold_output_folder

    # one run per output folder; only the process that writes files (rank 0) holds it
    main_process = os.environ.get("RANK", "0") == "0"
    with hold_output_folder(Path(recipe.output.dir), recipe.output.name, enabled=main_process):
        return _run(recipe, resume, force)


def _run(recipe: Recipe, resume: str | Path | None, force: bool) -> TrainResult:
    from loraforge.training.distributed import wait_for_everyone
    from loraforge.training.loop import train
    from loraforge.training.setup import setup_run

    run = setup_run(recipe, resume=resume, force=force)
    flag = StopFlag()
    display = make_display(run)

    def announce() -> None:
        display.message(
            "stopping after this step and saving a resumable state (Ctrl-C again to abort)"
        )

    try:
        with ctrl_c_stops(flag, announce), display:
            result = train(run, display, flag)
        wait_for_everyone(run.num_processes)
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
