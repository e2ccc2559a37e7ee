"""The training loop, top to bottom: epochs -> batches -> loss -> update -> saves and samples.

Everything it uses was built by :func:`loraforge.training.setup.setup_run`; it never reads the
recipe. The loss of a batch, the update, checkpoint rotation, sampling and logging are named
functions in their own modules.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from loraforge.training.display import LossWindow, StepReport, TrainingDisplay, ValidationReport
from loraforge.training.distributed import synchronise_step
from loraforge.training.divergence import divergence_error
from loraforge.training.early_stopping import ValidationTracker
from loraforge.training.metrics import VALIDATION
from loraforge.training.optim import set_eval_mode, set_train_mode
from loraforge.training.output_plan import (
    SaveKind,
    is_epoch_sample,
    is_epoch_save,
    is_step_sample,
    is_step_save,
    sample_points,
)
from loraforge.training.sample_grid import write_sample_grid
from loraforge.training.sampling import SampleRequest, sample_during_training
from loraforge.training.setup import TrainingRun
from loraforge.training.state import TrainingProgress
from loraforge.training.step import (
    accumulate_batch,
    apply_update,
    batch_seed,
    group_learning_rates,
    stop_text_encoder,
    text_encoder_trains,
    trainable_parameters,
)


class StopFlag:
    """Set (by the Ctrl-C handler) to stop at the next optimizer step with a saved state."""

    requested: bool = False


@dataclass(frozen=True)
class TrainResult:
    """How a run ended.

    Attributes:
        final_path: the final LoRA file, or the state folder of an interrupted run.
        progress: where training stands.
        interrupted: stopped by Ctrl-C (a resumable state was saved).
        losses: the loss of every optimizer step of this session.
        main_process: this process is the one that writes files and reports.
        stopped_early: early stopping ended the run (the final file and state are saved).
    """

    final_path: Path
    progress: TrainingProgress
    interrupted: bool
    losses: tuple[float, ...]
    main_process: bool = True
    stopped_early: bool = False


class StepProbe(Protocol):
    """Watches optimizer steps of a run (e.g. :class:`loraforge.vram.probe.MemoryProbe`)."""

    def step_starts(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) is about to draw its first batch."""

    def step_ended(self, step: int) -> None:
        """Optimizer step ``step`` has updated the weights."""


def train(
    run: TrainingRun,
    display: TrainingDisplay,
    stop: StopFlag,
    probe: StepProbe | None = None,
) -> TrainResult:
    """Train until ``max_train_steps``, Ctrl-C, early stopping, or a non-finite loss.

    Args:
        probe: told where each optimizer step starts and ends (memory measurement).

    Raises:
        TrainingError: the loss became NaN or infinite (the files saved so far are kept).
    """
    s = run.settings
    length = s.length
    progress = run.start
    window = LossWindow(length.steps_per_epoch, run.loss_history)
    tracker = ValidationTracker.restore(
        run.validation_history, min_delta=s.validation.min_delta, patience=s.validation.patience
    )
    run.checkpointer.validation_metadata = tracker.metadata()
    stopped_early = False
    losses: list[float] = []
    te_trains = text_encoder_trains(run.optimizer)
    position = None  # where the data stands when the run ends mid-epoch
    run.network.train()
    if s.sample.at_first and s.sample.prompts and progress.global_step == 0:
        take_samples(run, "step", 0, 0, display)  # the "before" column of the grid
    run.metrics.restart_clock()
    for epoch in range(progress.epoch, length.num_epochs):
        first = progress.step_in_epoch if epoch == progress.epoch else 0
        run.data.sampler.set_epoch(epoch)
        run.data.sampler.skip_batches(first)
        pending: list[torch.Tensor] = []
        for index, batch in enumerate(run.loader, start=first):
            if probe is not None and not pending:
                probe.step_starts(progress.global_step + 1)
            loss = accumulate_batch(
                run.loss_setup,
                batch,
                run.generator,
                batch_seed(s.seed, run.rank, progress.global_step, index),
                run.accelerator,
                accumulation=s.accumulation,
                train_text_encoder=te_trains,
            )
            pending.append(loss)
            if not is_update_batch(index, s.accumulation, length.batches_per_epoch):
                continue
            params = trainable_parameters(run.optimizer)
            step_loss = float(torch.stack(pending).mean())
            agreed = synchronise_step(params, step_loss, stop.requested, run.num_processes)
            pending = []
            check_finite(agreed.loss, progress.global_step + 1, run)
            update = apply_update(
                run.accelerator,
                run.optimizer,
                run.scheduler,
                run.network,
                params,
                max_grad_norm=s.max_grad_norm,
                scale_weight_norms=s.scale_weight_norms,
            )
            progress = TrainingProgress(progress.global_step + 1, epoch, index + 1)
            if run.ema is not None:
                run.ema.update(run.network, progress.global_step)
            if probe is not None:
                probe.step_ended(progress.global_step)
            losses.append(agreed.loss)
            report = StepReport(
                step=progress.global_step,
                epoch=epoch + 1,
                loss=agreed.loss,
                average=window.add(agreed.loss),
                lrs=group_learning_rates(run.optimizer, run.scheduler),
                max_norm=update.max_norm,
            )
            display.step(report)
            run.metrics.step(
                report, grad_norm=update.grad_norm, skipped=update.skipped, device=run.device
            )
            if te_trains and s.stop_text_encoder_step == progress.global_step:
                stop_text_encoder(run.optimizer)
                te_trains = False
                display.message(f"step {progress.global_step}: the text encoder stops training")
            stopped_early = after_step(run, progress, display, window, tracker)
            run.metrics.restart_clock()  # a step's time leaves out validation, saving, sampling
            if agreed.stop:
                state = run.checkpointer.interrupted_state(
                    run.network,
                    run.optimizer,
                    run.scheduler,
                    progress,
                    state_extra(run, window, tracker),
                )
                return TrainResult(state, progress, True, tuple(losses), run.is_main)
            if stopped_early or progress.global_step >= length.max_train_steps:
                break
        # the state keeps the true data position (mid-epoch when the steps ran out there), so
        # a run extended by raising its length continues with the next batch
        mid_epoch = progress.epoch == epoch and progress.step_in_epoch < length.batches_per_epoch
        position = progress if mid_epoch else None
        progress = TrainingProgress(progress.global_step, epoch + 1, 0)
        if stopped_early:
            break
        stopped_early = after_epoch(run, progress, display, window, tracker)
        run.metrics.restart_clock()
        if stopped_early or progress.global_step >= length.max_train_steps:
            break
    if stopped_early:
        display.message(tracker.stop_message())
    final = run.checkpointer.final(
        run.network,
        run.optimizer,
        run.scheduler,
        progress,
        state_extra(run, window, tracker),
        position=position,
    )
    return TrainResult(final, progress, False, tuple(losses), run.is_main, stopped_early)


def is_update_batch(index: int, accumulation: int, batches_per_epoch: int) -> bool:
    """Whether batch ``index`` (0-based in its epoch) ends an optimizer step: every
    ``accumulation`` batches, and at the epoch's last batch."""
    return (index + 1) % accumulation == 0 or index + 1 == batches_per_epoch


def check_finite(loss: float, step: int, run: TrainingRun) -> None:
    """Stop with a clear error before a non-finite loss reaches the weights.

    Raises:
        TrainingError: naming the step, what was saved, and the likely cause.
    """
    if math.isfinite(loss):
        return
    raise divergence_error(
        loss,
        step,
        saved_lora=run.checkpointer.last_lora,
        saved_state=run.checkpointer.last_state,
        suspects=run.divergence_suspects,
    )


def state_extra(run: TrainingRun, window: LossWindow, tracker: ValidationTracker) -> dict[str, Any]:
    """The loop's own data saved with a state: the loss window, the validation history, the
    process count and the fp16 grad scaler."""
    extra: dict[str, Any] = {
        "loss_window": list(window.values),
        "num_processes": run.num_processes,  # the data position is per process
        "validation": tracker.state(),
    }
    if run.scaler is not None:
        extra["scaler"] = run.scaler.state_dict()
    return extra


def after_step(
    run: TrainingRun,
    progress: TrainingProgress,
    display: TrainingDisplay,
    window: LossWindow,
    tracker: ValidationTracker,
) -> bool:
    """Step-based validation, saves and samples (``validate_every_n_steps``,
    ``save_every_n_steps``, ``sample.every_n_steps``); returns whether to stop early (the final
    save follows, so the step's own save is left out)."""
    s, step = run.settings, progress.global_step
    if s.validation.at_step(step) and validate(run, progress, display, tracker):
        return True
    if is_step_save(step, s.output, s.length):
        save_checkpoint(run, "step", step, progress, display, window, tracker)
    if is_step_sample(step, s.sample):
        take_samples(run, "step", step, step, display)
    return False


def after_epoch(
    run: TrainingRun,
    progress: TrainingProgress,
    display: TrainingDisplay,
    window: LossWindow,
    tracker: ValidationTracker,
) -> bool:
    """Epoch-end logging, validation, saves and samples (``validate_every_n_epochs``,
    ``save_every_n_epochs``, ``sample.every_n_epochs``); returns whether to stop early."""
    s, done = run.settings, progress.epoch
    display.epoch_done(done, window.average)
    if s.validation.at_epoch(done) and validate(run, progress, display, tracker):
        return True
    if is_epoch_save(done, s.output, s.length):
        save_checkpoint(run, "epoch", done, progress, display, window, tracker)
    if is_epoch_sample(done, s.sample):
        take_samples(run, "epoch", done, progress.global_step, display)
    return False


def validate(
    run: TrainingRun,
    progress: TrainingProgress,
    display: TrainingDisplay,
    tracker: ValidationTracker,
) -> bool:
    """Compute the validation loss (of the EMA weights when the run averages them: the weights
    the files hold), show it, keep the best file; returns whether early stopping ends the run. A step validated already (an epoch ending at a step validation) is not
    validated twice."""
    step = progress.global_step
    if run.validator is None or tracker.last_step == step:
        return False
    # the weights the files hold: the average when the run keeps one
    with run.ema.applied(run.network) if run.ema is not None else contextlib.nullcontext():
        loss = run.validator.loss(run.network, run.optimizer, run.accelerator.autocast)
    new_best = tracker.add(loss, step)
    run.checkpointer.validation_metadata = tracker.metadata()
    display.validation(ValidationReport(step, loss, tracker.best, tracker.best_step))
    run.metrics.record(
        VALIDATION,
        step,
        validation_loss=loss,
        best_validation_loss=tracker.best,
        best_step=tracker.best_step,
        since_improvement=tracker.since_improvement,
    )
    if new_best and run.settings.output.keep_best:
        path = run.checkpointer.best(run.network, run.optimizer, progress)
        display.message(f"step {step}: new best validation loss {loss:.6f}, saved {path}")
    return tracker.should_stop


def save_checkpoint(
    run: TrainingRun,
    kind: SaveKind,
    number: int,
    progress: TrainingProgress,
    display: TrainingDisplay,
    window: LossWindow,
    tracker: ValidationTracker,
) -> None:
    extra = state_extra(run, window, tracker)
    path = run.checkpointer.checkpoint(
        kind, number, run.network, run.optimizer, run.scheduler, progress, extra
    )
    display.message(f"saved {path}")


def take_samples(
    run: TrainingRun, kind: SaveKind, number: int, step: int, display: TrainingDisplay
) -> None:
    """Render the recipe's prompts on the main process and write them as PNGs."""
    if not run.is_main:
        # mirror the main process's eval/train switch of schedule-free optimizers (it
        # recomputes the weights), so every rank keeps the same weights
        set_eval_mode(run.optimizer)
        set_train_mode(run.optimizer)
        return
    s = run.settings
    request = SampleRequest(s.output.sample_dir, s.output.name, kind, number)
    # samples show what the file saved now holds: the averaged weights of an EMA run
    averaged = run.ema.applied(run.network) if run.ema is not None else contextlib.nullcontext()
    with averaged:
        written = sample_during_training(
            run.sample_models,
            run.network,
            run.optimizer,
            s.sample.prompts,
            s.sample.sampler,
            request,
            device=run.device,
            autocast=run.accelerator.autocast,
        )
    display.images(step, [(f"samples/{i:02d}", image) for i, (_, image) in enumerate(written)])
    run.metrics.samples(step, kind, number, s.sample.prompts, [path for path, _ in written])
    points = [(k, n) for at, k, n in sample_points(s.sample, s.length) if at <= step]
    grid = write_sample_grid(s.output.sample_dir, s.output.name, s.sample.prompts, points)
    also = f" and {grid.name}" if grid is not None else ""
    display.message(f"wrote {len(written)} sample image(s){also} to {s.output.sample_dir}")
