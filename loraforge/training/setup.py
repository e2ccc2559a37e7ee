"""Set-up of a training run: read the recipe once and build every object the loop uses.

Order matters and is the same on every process: data (cheap; it decides the run's length and so
which outputs would be overwritten) -> resume point -> models -> caches -> precision and
placement -> network (same seed on every rank, so every rank starts from the same weights) ->
optimizer and scheduler -> restored state. After this, nothing reads the recipe again.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from loraforge.backends.base import Network
from loraforge.console import info, warn
from loraforge.data.dataset import TrainingData, build_training_data, collate_samples
from loraforge.data.discovery import discover
from loraforge.data.holdout import missing_held_out_error
from loraforge.data.report import skipped_summary
from loraforge.machine import choose_cpu_threads
from loraforge.recipe import Recipe
from loraforge.training.build import (
    build_network,
    build_optimization,
    load_base_model,
    loss_setup,
    place_frozen_models,
    prepare_conditioning,
    sample_models,
)
from loraforge.training.distributed import broadcast_module
from loraforge.training.divergence import suspect_values
from loraforge.training.ema import NetworkEma
from loraforge.training.metrics import MetricsLog, open_metrics
from loraforge.training.output_plan import (
    existing_outputs,
    interrupt_state,
    owns_outputs,
    planned_outputs,
    refuse_existing,
)
from loraforge.training.precision import Precision, check_precision_on_device, resolve_precision
from loraforge.training.resume import ResumePoint, resolve_resume, restore_run, saved_step
from loraforge.training.run_facts import metadata_writer, run_facts
from loraforge.training.sampling import SampleModels
from loraforge.training.saving import Checkpointer
from loraforge.training.settings import (
    RunSettings,
    output_settings,
    run_settings,
    sample_settings,
    training_length,
)
from loraforge.training.state import TrainingProgress
from loraforge.training.step import LossSetup, stop_text_encoder
from loraforge.training.validation import Validator, build_validator


@dataclass
class TrainingRun:
    """Everything :func:`loraforge.training.loop.train` works with (built by :func:`setup_run`)."""

    settings: RunSettings
    precision: Precision
    accelerator: Any
    network: Network
    data: TrainingData
    loader: DataLoader
    optimizer: Any
    scheduler: Any
    loss_setup: LossSetup
    generator: torch.Generator
    checkpointer: Checkpointer
    sample_models: SampleModels
    start: TrainingProgress
    loss_history: tuple[float, ...] = ()
    divergence_suspects: tuple[str, ...] = ()  # recipe values a NaN loss is blamed on
    validator: Validator | None = None  # the held-out images' loss (None: nothing held out)
    validation_history: dict[str, Any] | None = None  # a resumed run's ValidationTracker state
    metrics: MetricsLog = field(default_factory=lambda: MetricsLog(None))  # the metrics file
    ema: NetworkEma | None = None  # the weight average (training.ema)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def scaler(self) -> Any | None:
        return getattr(self.accelerator, "scaler", None)


def make_accelerator(mixed_precision: str) -> Any:
    """An ``accelerate.Accelerator`` for this run (a process group under ``accelerate launch``
    or ``torchrun``; gloo between CPU processes).

    accelerate keeps one process-wide state; it is reset first so that several runs with
    different precisions can follow each other in one process (tests, notebooks).
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # Several processes without a GPU (torchrun / accelerate launch on a CPU machine): tell
    # accelerate, which otherwise looks for GPUs and runs each process alone.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = several and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C is the main process's to handle (it saves a state); workers keep serving batches.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(data: TrainingData, num_workers: int, pin_memory: bool) -> DataLoader:
    """The training DataLoader: prefetching persistent workers, pinned memory on CUDA."""
    return DataLoader(
        data.dataset,
        batch_sampler=data.sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
    )


def prepare_data(
    recipe: Recipe, accelerator: Any, num_workers: int
) -> tuple[TrainingData, DataLoader]:
    """Discover and bucket the dataset, sharded over the processes; ``num_workers`` loader
    processes decode the images."""
    t = recipe.training
    data = build_training_data(
        recipe.dataset,
        batch_size=t.batch_size,
        seed=t.seed,
        prior_loss_weight=t.prior_loss_weight,
        num_workers=0,  # this loader is replaced by make_loader's
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        with_images=recipe.cache.latents == "none",
        masks=t.masked_loss,
        # decoded once here: a bad image is skipped now, never in the middle of the run
        discovery=discover(recipe.dataset, verify=True),
    )
    missing = missing_held_out_error(recipe.dataset, len(data.plan.validation))
    if missing is not None:
        raise missing
    summary = skipped_summary([*data.discovery.skipped, *data.plan.skipped])
    if summary and accelerator.is_main_process:
        warn(summary)
    pin = accelerator.device.type == "cuda"
    return data, make_loader(data, num_workers, pin)


# torch's own default (one thread per physical core), read before anything changes it
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def use_cpu_threads(requested: int | None, num_workers: int, accelerator: Any) -> int:
    """On a CPU, set torch's intra-op thread count to what :func:`choose_cpu_threads` picks and
    say so; on a GPU leave torch alone.

    Returns:
        How many DataLoader worker processes to use.
    """
    if accelerator.device.type != "cpu":
        return num_workers
    choice = choose_cpu_threads(
        requested,
        num_workers,
        processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        limit=_TORCH_DEFAULT_THREADS,
    )
    torch.set_num_threads(choice.threads)
    if accelerator.is_main_process:
        info(
            f"training on the CPU with {choice.threads} thread(s) and {choice.workers} data "
            f"worker(s) ({choice.reason}; --threads N to choose)"
        )
    return choice.workers


def check_outputs(recipe: Recipe, length: Any, state_dir: Path | None, force: bool) -> None:
    """Refuse to overwrite outputs of an earlier run unless ``force`` (see :mod:`saving`); a
    run resumed from a state in its own folder owns them."""
    output = output_settings(recipe)
    planned = planned_outputs(output, sample_settings(recipe), length)
    planned.append(interrupt_state(output, length))
    existing = existing_outputs(planned, after_step=saved_step(state_dir), resumed_from=state_dir)
    if existing and owns_outputs(output, state_dir):
        info(f"resuming: {len(existing)} file(s) of the earlier run after its state are rewritten")
        return
    refuse_existing(existing, force=force, resuming=state_dir is not None)


def make_checkpointer(
    recipe: Recipe,
    data: TrainingData,
    network: Any,
    settings: RunSettings,
    precision: Precision,
    accelerator: Any,
    ema: NetworkEma | None = None,
) -> Checkpointer:
    """The file writer, with the run's metadata (the main process hashes the model files)."""
    facts = run_facts(
        recipe,
        data=data,
        network_metadata=network.metadata(),
        settings=settings,
        num_processes=accelerator.num_processes,
        hash_model_files=accelerator.is_main_process,
    )
    return Checkpointer(
        settings.output,
        precision.save_dtype,
        metadata_writer(recipe, facts),
        recipe.to_dict(),
        is_main=accelerator.is_main_process,
        ema=ema,
    )


def restore_and_sync(
    state_dir: Path | None,
    recipe: Recipe,
    network: Any,
    optimizer: Any,
    scheduler: Any,
    settings: RunSettings,
    accelerator: Any,
    ema: NetworkEma | None = None,
) -> ResumePoint:
    """Load the resume state (if any), re-apply a past text-encoder stop, and give every rank
    rank 0's network weights."""
    restored = restore_run(
        state_dir,
        recipe=recipe.to_dict(),
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=getattr(accelerator, "scaler", None),
        ema=ema,
    )
    saved_processes = restored.extra.get("num_processes", accelerator.num_processes)
    if saved_processes != accelerator.num_processes:
        warn(
            f"the state was saved by {saved_processes} process(es) and this run has "
            f"{accelerator.num_processes}: the epoch continues at the same batch index, so some "
            "images of this epoch may be seen twice or not at all"
        )
    stop_at = settings.stop_text_encoder_step
    if stop_at is not None and restored.progress.global_step >= stop_at:
        stop_text_encoder(optimizer)
    broadcast_module(network, accelerator.num_processes)
    return restored


def setup_run(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
) -> TrainingRun:
    """Build a run from a validated recipe.

    Args:
        recipe: the recipe.
        resume: a state folder, ``"auto"`` (the run's latest state) or ``None``.
        force: allow overwriting outputs of an earlier run.
        threads: intra-op threads for CPU training (default: chosen from the free cores, see
            :func:`loraforge.machine.choose_cpu_threads`).

    Raises:
        LoraforgeError: any user error found while setting up (dataset, model, precision,
            optimizer, existing outputs, an incompatible resume state).
    """
    t = recipe.training
    accelerator = make_accelerator(t.mixed_precision)
    device = accelerator.device
    workers = use_cpu_threads(threads, recipe.dataset.num_workers, accelerator)
    data, loader = prepare_data(recipe, accelerator, workers)
    length = training_length(
        len(data.sampler), t.gradient_accumulation_steps, t.max_train_epochs, t.max_train_steps
    )
    state_dir = resolve_resume(
        resume, output_settings(recipe), recipe.to_dict(), max_train_steps=length.max_train_steps
    )
    check_outputs(recipe, length, state_dir, force)
    precision = resolve_precision(t, recipe.output.save_precision)
    check_precision_on_device(precision, device)
    model = load_base_model(recipe)
    if not model.prediction_known and t.v_parameterization is None and accelerator.is_main_process:
        warn(
            f"{model.source} is an SD 2.x checkpoint that does not say whether it predicts "
            "epsilon or v; training it as epsilon (the 512 base models). For 768-v models set "
            "model.family: sd2-v"
        )
    settings = run_settings(
        recipe,
        family=model.family,
        family_v_prediction=model.v_prediction,
        length=length,
        variant=model.variant,
    )
    conditioning = prepare_conditioning(recipe, model, data, device, accelerator.is_main_process)
    place_frozen_models(recipe, model, precision, conditioning, device)
    network = build_network(recipe, model, precision)
    optimizer, scheduler = build_optimization(recipe, network, settings, accelerator)
    # the average starts from the initial weights of what the optimizer trains
    ema = NetworkEma(network, settings.ema) if settings.ema is not None else None
    restored = restore_and_sync(
        state_dir, recipe, network, optimizer, scheduler, settings, accelerator, ema
    )
    losses = loss_setup(
        t,
        model.unet,
        model.family,
        conditioning,
        v_prediction=settings.v_prediction,
        weight_dtype=precision.weight_dtype,
    )
    validator = build_validator(
        settings.validation,
        data,
        losses,
        batch_size=t.batch_size,
        seed=t.seed,
        frozen=[model.unet, *conditioning.text_encoders],
    )
    return TrainingRun(
        settings=settings,
        precision=precision,
        accelerator=accelerator,
        network=network,
        data=data,
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_setup=losses,
        generator=torch.Generator("cpu"),
        checkpointer=make_checkpointer(
            recipe, data, network, settings, precision, accelerator, ema
        ),
        sample_models=sample_models(model, conditioning, settings, precision),
        start=restored.progress,
        loss_history=tuple(restored.extra.get("loss_window", ())),
        divergence_suspects=suspect_values(recipe),
        validator=validator,
        validation_history=restored.extra.get("validation"),
        metrics=open_metrics(
            recipe,
            data,
            settings,
            device,
            start_step=restored.progress.global_step,
            resumed=state_dir is not None,
            is_main=accelerator.is_main_process,
        ),
        ema=ema,
    )
