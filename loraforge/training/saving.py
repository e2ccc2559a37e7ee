"""What a run writes and when: LoRA files, resumable states, sample images (sd-scripts' names).

:func:`planned_outputs` lists every file a run will write, for the dry run and for refusing to
overwrite existing outputs without ``--force``. :class:`Checkpointer` writes them during the run
(atomically, rank 0 only) and keeps the last N numbered ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraforge.errors import OutputExistsError
from loraforge.training.output_names import (
    RAW_EXT,
    best_ckpt_name,
    epoch_ckpt_name,
    epoch_state_name,
    last_ckpt_name,
    last_state_name,
    metrics_name,
    raw_ckpt_name,
    rotate,
    step_ckpt_name,
    step_state_name,
)
from loraforge.training.settings import OutputSettings, SampleSettings, TrainingLength
from loraforge.training.state import TrainingProgress

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


MetadataFor = Callable[[TrainingProgress], dict[str, str]]


class Checkpointer:
    """Writes LoRA files and resumable states during a run (only on the main process).

    Args:
        output: where and how often.
        save_dtype: dtype of the saved LoRA tensors.
        metadata_for: the metadata of a file saved at a given progress.
        recipe: the resolved recipe (``Recipe.to_dict()``), stored in states for resume checks.
        is_main: whether this process writes files.
        ema: the weight average: LoRA files hold it (and ``<file>-raw.safetensors`` the raw
            weights with ``output.save_raw``), states store it.

    Attributes:
        kept: the newest LoRA file and state folder written so far, by kind (``lora``,
            ``state``), with the step each holds: what an aborted run keeps.
        validation_metadata: metadata of the newest validation (``ss_validation_loss``,
            ``ss_validation_step``), written into every file saved after it.
    """

    def __init__(
        self,
        output: OutputSettings,
        save_dtype: Any,
        metadata_for: MetadataFor,
        recipe: Mapping[str, Any],
        *,
        is_main: bool,
        ema: Any = None,
    ) -> None:
        self.output = output
        self.save_dtype = save_dtype
        self.metadata_for = metadata_for
        self.recipe = recipe
        self.is_main = is_main
        self.ema = ema
        self.kept: dict[FileKind, tuple[int, Path]] = {}
        self.validation_metadata: dict[str, str] = {}

    def write_lora(
        self,
        file_name: str,
        network: Any,
        optimizer: Any,
        progress: TrainingProgress,
        *,
        keep: bool = True,
    ) -> Path:
        """Write the network as ``output.dir / file_name`` (schedule-free optimizers in eval):
        the EMA weights when the run keeps an average (and the raw ones next to them with
        ``save_raw``).

        Args:
            keep: record it as the run's newest save (:attr:`kept`).
        """
        from loraforge.ops.lora_file import write_lora_file
        from loraforge.training.ema import ema_metadata
        from loraforge.training.optim import set_eval_mode, set_train_mode

        path = self.output.dir / file_name
        raw_wanted = self.ema is None or self.output.save_raw
        raw = averaged = None
        # Every rank switches schedule-free optimizers to eval and back, so the weights (which
        # the switch recomputes) stay identical on all of them.
        set_eval_mode(optimizer)
        try:
            if self.is_main and raw_wanted:
                raw = network.state_dict_for_save(self.save_dtype)
            if self.is_main and self.ema is not None:
                with self.ema.applied(network):
                    averaged = network.state_dict_for_save(self.save_dtype)
        finally:
            set_train_mode(optimizer)
        if not self.is_main:
            return path
        metadata = {
            **self.metadata_for(progress),
            **self.validation_metadata,
            **network.metadata(),
        }
        step = progress.global_step
        # conflicts with existing files were refused up front
        if averaged is None:
            write_lora_file(path, raw, metadata, force=True)
        else:
            write_lora_file(
                path, averaged, {**metadata, **ema_metadata(self.ema, step)}, force=True
            )
            if raw is not None:
                raw_meta = {**metadata, **ema_metadata(self.ema, step, raw=True)}
                write_lora_file(
                    self.output.dir / raw_ckpt_name(file_name), raw, raw_meta, force=True
                )
        if keep:
            self.kept["lora"] = (step, path)
        return path

    def best(self, network: Any, optimizer: Any, progress: TrainingProgress) -> Path:
        """``name-best.safetensors``: the weights now, after a new lowest validation loss
        (written atomically; its ``ss_steps`` and ``ss_validation_step`` give the step)."""
        name = best_ckpt_name(self.output.name)
        return self.write_lora(name, network, optimizer, progress, keep=False)

    def write_state(
        self,
        folder_name: str,
        network: Any,
        optimizer: Any,
        scheduler: Any,
        progress: TrainingProgress,
        extra: Mapping[str, Any],
    ) -> Path:
        """Write a resumable state folder ``output.dir / folder_name`` atomically."""
        from loraforge.training.state import save_training_state

        path = self.output.dir / folder_name
        if not self.is_main:
            return path
        written = save_training_state(
            path,
            network_state=network.state_dict(),
            ema_state=self.ema.state_dict() if self.ema is not None else None,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress,
            recipe=self.recipe,
            extra=extra,
        )
        self.kept["state"] = (progress.global_step, written)
        return written

    @property
    def last_lora(self) -> Path | None:
        """The newest LoRA file this run wrote."""
        return self.kept["lora"][1] if "lora" in self.kept else None

    @property
    def last_state(self) -> Path | None:
        """The newest state folder this run wrote."""
        return self.kept["state"][1] if "state" in self.kept else None

    def checkpoint(
        self,
        kind: SaveKind,
        number: int,
        network: Any,
        optimizer: Any,
        scheduler: Any,
        progress: TrainingProgress,
        extra: Mapping[str, Any],
    ) -> Path:
        """An intermediate save (``name-000004`` or ``name-step00000100``), then keep-last-N."""
        name = self.output.name
        ckpt = epoch_ckpt_name(name, number) if kind == "epoch" else step_ckpt_name(name, number)
        path = self.write_lora(ckpt, network, optimizer, progress)
        if self.output.save_state:
            state = (
                epoch_state_name(name, number) if kind == "epoch" else step_state_name(name, number)
            )
            self.write_state(state, network, optimizer, scheduler, progress, extra)
        if self.is_main:
            rotate(self.output.dir, name, kind, self.output.save_last_n)
            if self.output.save_raw:
                rotate(self.output.dir, name, kind, self.output.save_last_n, ext=RAW_EXT)
            if self.output.save_state:
                rotate(self.output.dir, name, kind, self.output.save_last_n, states=True)
        return path

    def final(
        self,
        network: Any,
        optimizer: Any,
        scheduler: Any,
        progress: TrainingProgress,
        extra: Mapping[str, Any],
        *,
        position: TrainingProgress | None = None,
    ) -> Path:
        """The final ``name.safetensors``, and ``name-state`` with ``save_state`` or when one
        exists (it then says where the run ended, so a later ``--resume`` extends the run).

        Args:
            position: where the data stands, when the steps ran out mid-epoch (the state
                records it; ``progress`` counts that epoch as done for the file's metadata).
        """
        path = self.write_lora(last_ckpt_name(self.output.name), network, optimizer, progress)
        # an earlier Ctrl-C state this run continued must not stay behind at its old step
        stale = (self.output.dir / last_state_name(self.output.name)).exists()
        if self.output.save_state or stale:
            state = position or progress
            self.interrupted_state(network, optimizer, scheduler, state, extra)
        return path

    def interrupted_state(
        self,
        network: Any,
        optimizer: Any,
        scheduler: Any,
        progress: TrainingProgress,
        extra: Mapping[str, Any],
    ) -> Path:
        """The ``name-state`` folder (written on Ctrl-C, and at the end with ``save_state``)."""
        return self.write_state(
            last_state_name(self.output.name), network, optimizer, scheduler, progress, extra
        )
