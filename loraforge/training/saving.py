"""Writing a run's LoRA files and resumable states (atomically, rank 0 only), keeping the last N
numbered ones; :mod:`loraforge.training.output_plan` says which files and when.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loraforge.training.output_names import (
    RAW_EXT,
    best_ckpt_name,
    epoch_ckpt_name,
    epoch_state_name,
    last_ckpt_name,
    last_state_name,
    raw_ckpt_name,
    rotate,
    step_ckpt_name,
    step_state_name,
)
from loraforge.training.output_plan import FileKind, SaveKind
from loraforge.training.settings import OutputSettings
from loraforge.training.state import TrainingProgress

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
