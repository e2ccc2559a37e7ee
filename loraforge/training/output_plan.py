"""What a run writes and when: the save and sample schedule, sd-scripts' file names, and the
list of every file a run will write (for the dry run, and for refusing to overwrite existing
outputs without ``--force``). :mod:`loraforge.training.saving` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.errors import OutputExistsError
from loraforge.training.output_names import (
    best_ckpt_name,
    epoch_ckpt_name,
    epoch_state_name,
    last_ckpt_name,
    last_state_name,
    metrics_name,
    raw_ckpt_name,
    step_ckpt_name,
    step_state_name,
)
from loraforge.training.settings import OutputSettings, SampleSettings, TrainingLength

FileKind = Literal["lora", "state", "sample", "metrics"]
SaveKind = Literal["epoch", "step"]


@dataclass(frozen=True)
class PlannedFile:
    """One output of a run.

    Attributes:
        step: the global step at which it is written.
        path: where.
        kind: ``lora`` | ``state`` (a folder) | ``sample`` (a PNG) | ``metrics`` (the
            metrics file, listed at step 1: a resumed run appends to it).
    """

    step: int
    path: Path
    kind: FileKind


def epoch_end_step(epoch: int, length: TrainingLength) -> int:
    """The global step when ``epoch`` (1-based count of finished epochs) ends."""
    return min(epoch * length.steps_per_epoch, length.max_train_steps)


def is_epoch_save(epochs_done: int, output: OutputSettings, length: TrainingLength) -> bool:
    """sd-scripts: every N epochs, except after the last one (the final file covers it)."""
    n = output.save_every_n_epochs
    return bool(n) and epochs_done % n == 0 and epochs_done < length.num_epochs


def is_step_save(step: int, output: OutputSettings, length: TrainingLength) -> bool:
    """Every N steps, except the last step (the final file covers it)."""
    n = output.save_every_n_steps
    return bool(n) and step % n == 0 and step < length.max_train_steps


def is_epoch_sample(epochs_done: int, sample: SampleSettings) -> bool:
    n = sample.every_n_epochs
    return bool(sample.prompts) and bool(n) and epochs_done % n == 0


def is_step_sample(step: int, sample: SampleSettings) -> bool:
    n = sample.every_n_steps
    return bool(sample.prompts) and bool(n) and step % n == 0


def sample_points(
    sample: SampleSettings, length: TrainingLength
) -> list[tuple[int, SaveKind, int]]:
    """Every sampling point of a run as ``(global step, kind, number)``, in order: step 0 with
    ``sample.at_first``, then the step and epoch samples."""
    if not sample.prompts:
        return []
    points: list[tuple[int, SaveKind, int]] = [(0, "step", 0)] if sample.at_first else []
    points += [(epoch_end_step(e, length), "epoch", e) for e in range(1, length.num_epochs + 1)
               if is_epoch_sample(e, sample)]  # fmt: skip
    points += [(s, "step", s) for s in range(1, length.max_train_steps + 1)
               if is_step_sample(s, sample)]  # fmt: skip
    return sorted(points, key=lambda p: (p[0], p[1] == "step"))


def grid_file_name(name: str) -> str:
    """``lora_grid.png``: every sample of the run so far, prompts down, sampling points across."""
    return f"{name}_grid.png"


def sample_file_name(name: str, kind: SaveKind, number: int, index: int, seed: int) -> str:
    """``lora_e000002_00_42.png`` (after epoch 2) or ``lora_000100_00_42.png`` (step 100)."""
    count = f"e{number:06d}" if kind == "epoch" else f"{number:06d}"
    return f"{name}_{count}_{index:02d}_{seed}.png"


def _checkpoint_files(
    output: OutputSettings, step: int, file_name: str, state_name: str
) -> list[PlannedFile]:
    """A numbered save: the LoRA file, and its state folder with ``save_state``."""
    files = _save_files(output, step, file_name)
    if output.save_state:
        files.append(PlannedFile(step, output.dir / state_name, "state"))
    return files


def planned_outputs(
    output: OutputSettings, sample: SampleSettings, length: TrainingLength
) -> list[PlannedFile]:
    """Every file the run writes, in order of the step that writes it (see also
    :func:`interrupt_state`, which Ctrl-C writes)."""
    files = [PlannedFile(1, output.dir / metrics_name(output.name), "metrics")]
    for epoch in range(1, length.num_epochs + 1):
        step = epoch_end_step(epoch, length)
        if is_epoch_save(epoch, output, length):
            files += _checkpoint_files(
                output,
                step,
                epoch_ckpt_name(output.name, epoch),
                epoch_state_name(output.name, epoch),
            )
        if is_epoch_sample(epoch, sample):
            files += _sample_files(output, sample, step, "epoch", epoch)
    for step in range(1, length.max_train_steps + 1):
        if is_step_save(step, output, length):
            files += _checkpoint_files(
                output, step, step_ckpt_name(output.name, step), step_state_name(output.name, step)
            )
        if is_step_sample(step, sample):
            files += _sample_files(output, sample, step, "step", step)
    points = sample_points(sample, length)
    if points:
        step, kind, number = points[0]
        if step == 0:
            files += _sample_files(output, sample, 0, kind, number)
        files.append(PlannedFile(step, output.sample_dir / grid_file_name(output.name), "sample"))
    final = length.max_train_steps
    if output.keep_best:  # rewritten at any validation, the first of which may come at step 1
        files += _save_files(output, 1, best_ckpt_name(output.name))
    files += _save_files(output, final, last_ckpt_name(output.name))
    if output.save_state:
        files.append(interrupt_state(output, length))
    return sorted(files, key=lambda f: f.step)


def interrupt_state(output: OutputSettings, length: TrainingLength) -> PlannedFile:
    """The ``<name>-state`` folder: written on Ctrl-C (at any step), and at the end with
    ``save_state``. An existing one belongs to an earlier run, so it counts as an output."""
    return PlannedFile(length.max_train_steps, output.dir / last_state_name(output.name), "state")


def _save_files(output: OutputSettings, step: int, file_name: str) -> list[PlannedFile]:
    files = [PlannedFile(step, output.dir / file_name, "lora")]
    if output.save_raw:
        files.append(PlannedFile(step, output.dir / raw_ckpt_name(file_name), "lora"))
    return files


def _sample_files(
    output: OutputSettings, sample: SampleSettings, step: int, kind: SaveKind, number: int
) -> list[PlannedFile]:
    return [
        PlannedFile(
            step,
            output.sample_dir / sample_file_name(output.name, kind, number, p.index, p.seed),
            "sample",
        )
        for p in sample.prompts
    ]


def existing_outputs(
    planned: list[PlannedFile], *, after_step: int = 0, resumed_from: Path | None = None
) -> list[Path]:
    """Planned outputs that exist already and would be replaced after ``after_step``.

    A resumed run rewrites only what comes after its state; the state it resumes from is its own.
    """
    resumed = resumed_from.resolve() if resumed_from is not None else None
    return [
        f.path
        for f in planned
        if f.step > after_step and f.path.exists() and f.path.resolve() != resumed
    ]


def refuse_existing(paths: list[Path], *, force: bool, resuming: bool = False) -> None:
    """Raise unless ``force`` when a run would overwrite existing outputs.

    Args:
        resuming: the run continues a state (``--resume``), so the hint does not suggest it.

    Raises:
        OutputExistsError: naming the first files and the ``--force`` fix.
    """
    if not paths or force:
        return
    shown = ", ".join(str(p) for p in paths[:3]) + (
        f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    )
    hint = "pass --force to overwrite them, or change output.name or output.dir"
    if not resuming:
        hint += ", or continue the earlier run with --resume auto"
    raise OutputExistsError(f"training would overwrite existing outputs: {shown}", hint=hint)


def owns_outputs(output: OutputSettings, state_dir: Path | None) -> bool:
    """A run resumed from a state in its own output folder continues that run, so the files that
    run wrote after the state (a save interrupted by a crash, the final file of a run being
    extended) are its own to rewrite."""
    return state_dir is not None and state_dir.resolve().parent == output.dir.resolve()
