"""Building the pieces of a run from the recipe: the base model in its training dtypes, the
caches and conditioning, the network, the optimizer and scheduler, and the loss inputs.

Called in this order by :func:`loraforge.training.setup.setup_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from loraforge.backends import create_network
from loraforge.backends.base import Network
from loraforge.console import err, info, warn
from loraforge.data.dataset import TrainingData
from loraforge.recipe import Recipe
from loraforge.training.conditioning import Conditioning, TextEncoding
from loraforge.training.loss import LossOptions
from loraforge.training.noise import NoiseOptions, build_noise_schedule, check_timestep_range
from loraforge.training.precision import (
    Precision,
    cast_frozen_models,
    configure_attention,
    enable_gradient_checkpointing,
    move_module,
)
from loraforge.training.settings import RunSettings
from loraforge.training.step import LossSetup

if TYPE_CHECKING:
    from loraforge.recipe import TrainingConfig


def load_base_model(recipe: Recipe) -> Any:
    """Load the base model in float32 (cast per the precision rules after caching); SD3 / FLUX
    load straight in the training's weight dtype (FLUX and T5-XXL in float32 would take 66 GB
    of RAM)."""
    from loraforge.models.loading import load_model
    from loraforge.training.precision import resolve_precision

    m = recipe.model
    precision = resolve_precision(recipe.training, recipe.output.save_precision)
    with err.status(f"loading {m.base}…"):
        return load_model(
            m.base,
            family=m.family,
            vae=m.vae,
            allow_pickle=m.allow_pickle,
            encoder_files={"clip_l": m.clip_l, "clip_g": m.clip_g, "t5xxl": m.t5xxl},
            flow_dtype=precision.weight_dtype,
        )


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
    from loraforge.models.flow_prompts import caption_token_length

    m = recipe.model
    tokens = caption_token_length(
        model.family, model.variant, m.max_token_length, m.t5xxl_max_token_length
    )
    return Conditioning(
        model.vae,
        model.text_encoders,
        model.tokenizers,
        TextEncoding(model.family, m.clip_skip, tokens),
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
    if t.blocks_to_swap and model.family in ("sd3", "flux"):
        from loraforge.training.block_swap import enable_block_swap

        cast_frozen_models([model.unet], precision, torch.device("cpu"))
        swapped = enable_block_swap(model.unet, model.family, t.blocks_to_swap, device)
        info(f"block swap: {len(swapped)} transformer blocks wait in CPU memory")
        cast_frozen_models(live_encoders, precision, device)
    else:
        cast_frozen_models([model.unet, *live_encoders], precision, device)
    configure_attention(model.unet, live_encoders, t.attention)
    if t.gradient_checkpointing:
        te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
        trains_te = n.train_text_encoder and te_lr > 0
        enable_gradient_checkpointing(model.unet, live_encoders if trains_te else [])
        if t.cpu_offload_checkpointing and model.family in ("sd3", "flux"):
            from loraforge.training.offload_checkpointing import enable_cpu_offload_checkpointing

            enable_cpu_offload_checkpointing(model.unet)


def build_network(recipe: Recipe, model: Any, precision: Precision) -> Network:
    """Create and hook the network; same seed on every rank, so the initial weights agree.

    ``network.weights`` (continue from a LoRA file) is loaded non-strictly: modules the file
    lacks keep their initial (no-op) weights, and the counts are reported.

    Raises:
        LoraFileError: the file cannot be read or no module matches it.
    """
    network = create_hooked_network(recipe, model.family, model.unet, model.text_encoders)
    if recipe.network.weights:
        from loraforge.errors import LoraFileError
        from loraforge.ops.load_lora import load_lora

        # the checks `check` makes (values, structure); lycoris-lora's flat TE names restored
        loaded = load_lora(recipe.network.weights)
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


def create_hooked_network(
    recipe: Recipe, family: str, unet: Any, text_encoders: Sequence[Any]
) -> Network:
    """The recipe's network, seeded with ``training.seed`` and hooked into the models."""
    torch.manual_seed(recipe.training.seed)
    network = create_network(recipe.network, family, unet, text_encoders)
    network.apply_to()
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
    training: TrainingConfig,
    unet: Any,
    family: str,
    conditioning: Conditioning,
    *,
    v_prediction: bool,
    weight_dtype: torch.dtype,
) -> LossSetup:
    """The fixed inputs of every batch's loss (noise schedule, noise and loss options; the
    flow-matching options for SD3 / FLUX, whose ``unet`` is the transformer)."""
    from loraforge.models.families import family_spec
    from loraforge.training.flow import FlowOptions

    schedule = build_noise_schedule(zero_terminal_snr=training.zero_terminal_snr)
    check_timestep_range(training.min_timestep, training.max_timestep, schedule.num_train_timesteps)
    flow = None
    if family_spec(family).flow_matching:
        guided = bool(getattr(unet.config, "guidance_embeds", False))
        flow = FlowOptions.from_training(training, family, guided=guided)
    return LossSetup(
        unet=unet,
        conditioning=conditioning,
        schedule=schedule,
        noise=NoiseOptions.from_training(training),
        loss=LossOptions.from_training(training, v_prediction),
        weight_dtype=weight_dtype,
        is_sdxl=family == "sdxl",
        family=family,
        flow=flow,
    )


def sample_models(
    model: Any, conditioning: Conditioning, settings: RunSettings, precision: Precision
) -> Any:
    """What sampling uses; a sampler whose package is missing fails here, not at the first
    sample."""
    from loraforge.training.sampling import SampleModels, make_scheduler

    config = model.noise_scheduler.config
    flow = model.family in ("sd3", "flux")  # always the flow-matching Euler sampler
    if settings.sample.enabled and not flow:
        make_scheduler(settings.sample.sampler, config, settings.v_prediction)
    return SampleModels(
        unet=model.unet,
        vae=model.vae,
        conditioning=conditioning,
        scheduler_config=config,
        v_prediction=settings.v_prediction,
        weight_dtype=precision.weight_dtype,
        is_sdxl=model.family == "sdxl",
        family=model.family,
    )
