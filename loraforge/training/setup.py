"""Set-up of a training run: read the recipe once and build every object the loop uses.

Order matters and is the same on every process: data (cheap; it decides the run's length and so
which outputs would be overwritten) -> resume point -> models -> caches -> precision and
placement -> network (same seed on every rank, so every rank starts from the same weights) ->
optimizer and scheduler -> restored state. After this, nothing reads the recipe again.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from loraforge.backends import create_network
from loraforge.backends.base import Network
from loraforge.console import err, info, warn
from loraforge.data.dataset import TrainingData, build_training_data, collate_samples
from loraforge.data.discovery import discover
from loraforge.recipe import Recipe
from loraforge.training.conditioning import Conditioning, TextEncoding
from loraforge.training.distributed import broadcast_module
from loraforge.training.loss import LossOptions
from loraforge.training.noise import NoiseOptions, build_noise_schedule, check_timestep_range
from loraforge.training.precision import (
    Precision,
    cast_frozen_models,
    check_precision_on_device,
    configure_attention,
    enable_gradient_checkpointing,
    move_module,
    resolve_precision,
)
from loraforge.training.resume import resolve_resume, restore_run, saved_step
from loraforge.training.run_facts import metadata_writer, run_facts
from loraforge.training.sampling import SampleModels
from loraforge.training.saving import (
    Checkpointer,
    existing_outputs,
    interrupt_state,
    planned_outputs,
    refuse_existing,
)
from loraforge.training.settings import RunSettings, run_settings, training_length
from loraforge.training.state import TrainingProgress
from loraforge.training.step import LossSetup, stop_text_encoder


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
    """An ``accelerate.Accelerator`` for this run (a process group under ``accelerate launch``).

    accelerate keeps one process-wide state; it is reset first so that several runs with
    different precisions can follow each other in one process (tests, notebooks).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


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


def prepare_data(recipe: Recipe, accelerator: Any) -> tuple[TrainingData, DataLoader]:
    """Discover and bucket the dataset, sharded over the processes."""
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
        discovery=discover(recipe.dataset),
    )
    pin = accelerator.device.type == "cuda"
    return data, make_loader(data, recipe.dataset.num_workers, pin)


def load_base_model(recipe: Recipe) -> Any:
    """Load the base model in float32 (cast per the precision rules after caching)."""
    from loraforge.models.loading import load_model

    m = recipe.model
    with err.status(f"loading {m.base}…"):
        return load_model(m.base, family=m.family, vae=m.vae, allow_pickle=m.allow_pickle)


def prepare_conditioning(
    recipe: Recipe, model: Any, data: TrainingData, device: torch.device, is_main: bool
) -> Conditioning:
    """Build the caches the recipe asks for and the :class:`Conditioning` that reads them.

    The VAE and text encoders encode on ``device`` in the dtypes ``loraforge cache`` uses, so
    its disk entries are reused; a cached part then goes back to the CPU in float32 (only
    sampling uses it).
    """
    from loraforge.data.cache_setup import prepare_caches, vae_dtype
    from loraforge.progress import progress_callback

    move_module(model.vae, device, vae_dtype(recipe, model.family, device))
    for encoder in model.text_encoders:
        move_module(encoder, device)
    caches = prepare_caches(
        recipe,
        model,
        data.plan,
        data.discovery.subsets,
        progress=partial(progress_callback, err, enabled=is_main),
    )
    if caches.latents is not None:
        move_module(model.vae, "cpu", torch.float32)
    if caches.text is not None:
        for encoder in model.text_encoders:
            move_module(encoder, "cpu", torch.float32)
    m = recipe.model
    return Conditioning(
        model.vae,
        model.text_encoders,
        model.tokenizers,
        TextEncoding(model.family, m.clip_skip, m.max_token_length),
        device,
        latent_cache=caches.latents,
        text_cache=caches.text,
    )


def place_frozen_models(
    recipe: Recipe,
    model: Any,
    precision: Precision,
    conditioning: Conditioning,
    device: torch.device,
) -> None:
    """UNet (and live text encoders) to the device in their dtypes; attention kernel and
    activation checkpointing as the recipe asks."""
    t, n = recipe.training, recipe.network
    live_encoders = list(model.text_encoders) if conditioning.text_cache is None else []
    cast_frozen_models([model.unet, *live_encoders], precision, device)
    configure_attention(model.unet, live_encoders, t.attention)
    if t.gradient_checkpointing:
        trains_te = n.train_text_encoder and (t.text_encoder_lr or t.learning_rate) > 0
        enable_gradient_checkpointing(model.unet, live_encoders if trains_te else [])


def build_network(recipe: Recipe, model: Any, precision: Precision) -> Network:
    """Create and hook the network; same seed on every rank, so the initial weights agree.

    ``network.weights`` (continue from a LoRA file) is loaded non-strictly: modules the file
    lacks keep their initial (no-op) weights, and the counts are reported.

    Raises:
        LoraFileError: the file cannot be read or no module matches it.
    """
    torch.manual_seed(recipe.training.seed)
    network = create_network(recipe.network, model.family, model.unet, model.text_encoders)
    network.apply_to()
    if recipe.network.weights:
        from loraforge.errors import LoraFileError
        from loraforge.ops.lora_file import read_lora_file

        loaded = read_lora_file(recipe.network.weights)
        result = network.load_weights(loaded.tensors, strict=False)
        total = len(list(network.children()))
        if len(result.missing) == total:
            raise LoraFileError(
                f"{recipe.network.weights}: no tensor matches a module of this network",
                hint="check that the file is a LoRA for this model family and algorithm",
            )
        if result.missing or result.unexpected:
            warn(
                f"network.weights: {len(result.missing)} modules start fresh, "
                f"{len(result.unexpected)} tensors of the file fit no module"
            )
        info(f"continuing from {recipe.network.weights}")
    network.to(dtype=precision.network_dtype)
    return network


def build_optimization(
    recipe: Recipe, network: Network, settings: RunSettings, accelerator: Any
) -> tuple[Any, Any]:
    """The optimizer over the network's parameter groups (wrapped by accelerate for grad
    scaling) and the LR scheduler, stepped once per optimizer step."""
    from loraforge.training.optim import build_optimizer
    from loraforge.training.schedulers import build_scheduler

    t = recipe.training
    groups = network.param_groups(settings.unet_lr, settings.text_encoder_lr)
    optimizer = build_optimizer(t.optimizer, groups, t.learning_rate, t.optimizer_args)
    optimizer = accelerator.prepare(optimizer)
    if t.full_fp16:
        from loraforge.training.precision import allow_fp16_gradients

        allow_fp16_gradients(accelerator)
    scheduler = build_scheduler(
        t.lr_scheduler,
        optimizer,
        settings.length.max_train_steps,
        t.lr_warmup_steps,
        t.lr_scheduler_num_cycles,
        t.lr_scheduler_power,
        learning_rate=t.learning_rate,
    )
    return optimizer, scheduler


def loss_setup(
    recipe: Recipe,
    model: Any,
    conditioning: Conditioning,
    settings: RunSettings,
    precision: Precision,
) -> LossSetup:
    """The fixed inputs of every batch's loss (noise schedule, noise and loss options)."""
    t = recipe.training
    schedule = build_noise_schedule(zero_terminal_snr=t.zero_terminal_snr)
    check_timestep_range(t.min_timestep, t.max_timestep, schedule.num_train_timesteps)
    return LossSetup(
        unet=model.unet,
        conditioning=conditioning,
        schedule=schedule,
        noise=NoiseOptions.from_training(t),
        loss=LossOptions.from_training(t, settings.v_prediction),
        weight_dtype=precision.weight_dtype,
        is_sdxl=model.family == "sdxl",
    )


def check_outputs(recipe: Recipe, length: Any, state_dir: Path | None, force: bool) -> None:
    """Refuse to overwrite outputs of an earlier run unless ``force`` (see :mod:`saving`)."""
    from loraforge.training.settings import output_settings, sample_settings

    output = output_settings(recipe)
    planned = planned_outputs(output, sample_settings(recipe), length)
    planned.append(interrupt_state(output, length))
    existing = existing_outputs(planned, after_step=saved_step(state_dir), resumed_from=state_dir)
    refuse_existing(existing, force=force)


def setup_run(
    recipe: Recipe, *, resume: str | Path | None = None, force: bool = False
) -> TrainingRun:
    """Build a run from a validated recipe.

    Args:
        recipe: the recipe.
        resume: a state folder, ``"auto"`` (the run's latest state) or ``None``.
        force: allow overwriting outputs of an earlier run.

    Raises:
        LoraforgeError: any user error found while setting up (dataset, model, precision,
            optimizer, existing outputs, an incompatible resume state).
    """
    t = recipe.training
    accelerator = make_accelerator(t.mixed_precision)
    device = accelerator.device
    data, loader = prepare_data(recipe, accelerator)
    length = training_length(
        len(data.sampler), t.gradient_accumulation_steps, t.max_train_epochs, t.max_train_steps
    )
    from loraforge.training.settings import output_settings

    state_dir = resolve_resume(resume, output_settings(recipe), recipe.to_dict())
    check_outputs(recipe, length, state_dir, force)
    precision = resolve_precision(t, recipe.output.save_precision)
    check_precision_on_device(precision, device)
    model = load_base_model(recipe)
    settings = run_settings(
        recipe, family=model.family, family_v_prediction=model.v_prediction, length=length
    )
    conditioning = prepare_conditioning(recipe, model, data, device, accelerator.is_main_process)
    place_frozen_models(recipe, model, precision, conditioning, device)
    network = build_network(recipe, model, precision)
    optimizer, scheduler = build_optimization(recipe, network, settings, accelerator)
    scaler = getattr(accelerator, "scaler", None)
    restored = restore_run(
        state_dir,
        recipe=recipe.to_dict(),
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
    )
    stop_at = settings.stop_text_encoder_step
    if stop_at is not None and restored.progress.global_step >= stop_at:
        stop_text_encoder(optimizer)
    broadcast_module(network, accelerator.num_processes)
    facts = run_facts(
        recipe,
        data=data,
        network_metadata=network.metadata(),
        settings=settings,
        num_processes=accelerator.num_processes,
        hash_model_files=accelerator.is_main_process,
    )
    checkpointer = Checkpointer(
        settings.output,
        precision.save_dtype,
        metadata_writer(recipe, facts),
        recipe.to_dict(),
        is_main=accelerator.is_main_process,
    )
    losses = loss_setup(recipe, model, conditioning, settings, precision)
    sample_models = SampleModels(
        unet=model.unet,
        vae=model.vae,
        conditioning=conditioning,
        scheduler_config=model.noise_scheduler.config,
        v_prediction=settings.v_prediction,
        weight_dtype=precision.weight_dtype,
        is_sdxl=model.family == "sdxl",
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
        checkpointer=checkpointer,
        sample_models=sample_models,
        start=restored.progress,
        loss_history=tuple(restored.extra.get("loss_window", ())),
    )
