"""One training step: the loss of a batch (forward + backward) and the optimizer update.

Randomness is re-seeded for every batch from ``(seed, rank, step, batch)``, so a batch draws the
same noise, timesteps and dropout masks whether the run was interrupted before it or not, on
every rank (resume-equals-uninterrupted without saving per-rank generator states).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.backends.base import MaxNormResult, Network
from loraforge.models.prompts import PromptEmbeds
from loraforge.training.conditioning import Conditioning, sdxl_size_ids, unet_conditioning
from loraforge.training.flow import (
    FlowBatch,
    FlowOptions,
    noisy_flow_input,
    prediction_and_target,
)
from loraforge.training.loss import LossOptions, conditional_loss, per_sample_mean, training_loss
from loraforge.training.noise import (
    NoiseOptions,
    NoiseSchedule,
    noise_noisy_latents_and_timesteps,
    prediction_target,
)

TEXT_ENCODER_GROUP = "textencoder"


@dataclass(frozen=True)
class LossSetup:
    """Everything the loss of a batch depends on besides the batch (fixed for a run).

    ``unet`` is the denoiser: the UNet, or the SD3 / FLUX transformer when ``flow`` is set
    (then ``family`` says which, and the flow-matching options replace ``schedule``/``noise``).
    """

    unet: Any
    conditioning: Conditioning
    schedule: NoiseSchedule
    noise: NoiseOptions
    loss: LossOptions
    weight_dtype: torch.dtype
    is_sdxl: bool
    family: str = "sd1"
    flow: FlowOptions | None = None


def batch_seed(seed: int, rank: int, step: int, batch_index: int) -> int:
    """A 63-bit seed for one batch, a pure function of where it is in the run."""
    return random.Random(f"loraforge:{seed}:{rank}:{step}:{batch_index}").getrandbits(63)


def seed_batch(generator: torch.Generator, seed: int) -> None:
    """Seed the noise generator and torch's global RNG (dropout, module dropout) for a batch."""
    generator.manual_seed(seed)
    torch.manual_seed(seed)


def batch_loss(
    setup: LossSetup,
    batch: Mapping[str, Any],
    generator: torch.Generator,
    *,
    train_text_encoder: bool,
    autocast: Any,
) -> torch.Tensor:
    """The loss of one batch (0-dim float32), computed as sd-scripts' ``process_batch`` does.

    Args:
        setup: the run's fixed loss inputs.
        batch: a batch from the data loader (see :mod:`loraforge.data.dataset`).
        generator: the seeded noise generator (VAE posterior, noise, timesteps).
        train_text_encoder: run the text encoders with gradients.
        autocast: a context manager factory for mixed precision (``accelerator.autocast``).
    """
    latents = setup.conditioning.latents(batch, generator)
    with autocast():
        embeds = setup.conditioning.text(batch["captions"], with_grad=train_text_encoder)
    if setup.flow is not None:
        return flow_loss(setup, setup.flow, latents, embeds, batch, generator, autocast)
    noisy = noise_noisy_latents_and_timesteps(latents, setup.schedule, setup.noise, generator)
    device = latents.device
    size_ids = sdxl_size_ids(batch, device) if setup.is_sdxl else None
    kwargs = unet_conditioning(embeds, size_ids, setup.weight_dtype)
    with autocast():
        pred = setup.unet(
            noisy.noisy_latents.to(setup.weight_dtype), noisy.timesteps, **kwargs
        ).sample
    target = prediction_target(
        setup.schedule, latents, noisy.noise, noisy.timesteps, setup.loss.v_prediction
    )
    weights = batch["loss_weights"].to(device)
    mask = None
    if setup.loss.masked_loss:
        mask = setup.conditioning.masks(batch, (latents.shape[-2], latents.shape[-1]))
    return training_loss(pred, target, noisy.timesteps, weights, setup.schedule, setup.loss, mask)


def flow_loss(
    setup: LossSetup,
    flow: FlowOptions,
    latents: torch.Tensor,
    embeds: PromptEmbeds,
    batch: Mapping[str, Any],
    generator: torch.Generator,
    autocast: Any,
) -> torch.Tensor:
    """The rectified-flow loss of a batch (SD3 / FLUX; see :mod:`loraforge.training.flow`),
    with noise and noise levels drawn from ``generator`` (see :func:`flow_draw_loss`)."""
    draw = noisy_flow_input(latents, flow, generator)
    weights = batch["loss_weights"].to(latents.device)
    return flow_draw_loss(setup, flow, latents, embeds, draw, autocast).mul(weights).mean()


def flow_draw_loss(
    setup: LossSetup,
    flow: FlowOptions,
    latents: torch.Tensor,
    embeds: PromptEmbeds,
    draw: FlowBatch,
    autocast: Any,
) -> torch.Tensor:
    """``(B,)`` per-sample rectified-flow losses of one draw: element-wise loss ->
    ``weighting_scheme`` weights (``sigma_scaled``) -> mean per sample, as sd-scripts'
    ``process_batch`` (the caller applies the per-sample weights and the batch mean). Huber
    losses use the constant ``huber_c * huber_scale`` (the SNR schedules are DDPM quantities)."""
    from loraforge.models.flow_transformer import denoise

    with autocast():
        output = denoise(
            setup.unet,
            setup.family,
            draw.noisy,
            draw.timesteps,
            embeds,
            guidance=flow.guidance,
            dtype=setup.weight_dtype,
        )
    pred, target, weighting = prediction_and_target(output.float(), latents, draw, flow)
    options = setup.loss
    huber_c = None
    if options.loss_type in ("huber", "smooth_l1"):
        huber_c = torch.full((latents.shape[0],), options.huber_c * options.huber_scale)
        huber_c = huber_c.to(latents.device)
    loss = conditional_loss(pred.float(), target.float(), options.loss_type, "none", huber_c)
    if weighting is not None:
        loss = loss * weighting
    return per_sample_mean(loss)


def accumulate_batch(
    setup: LossSetup,
    batch: Mapping[str, Any],
    generator: torch.Generator,
    seed: int,
    accelerator: Any,
    *,
    accumulation: int,
    train_text_encoder: bool,
) -> torch.Tensor:
    """Seed the batch, compute its loss and add its share of the step's gradient.

    Args:
        setup, batch, generator, train_text_encoder: as for :func:`batch_loss`.
        seed: the batch's seed (:func:`batch_seed`).
        accelerator: ``autocast()`` and ``backward(loss)`` (accelerate's, or the VRAM trace's).
        accumulation: batches per optimizer step (the loss is divided by it).

    Returns:
        The batch's loss, detached.
    """
    seed_batch(generator, seed)
    loss = batch_loss(
        setup,
        batch,
        generator,
        train_text_encoder=train_text_encoder,
        autocast=accelerator.autocast,
    )
    accelerator.backward(loss / accumulation)
    return loss.detach()


def trainable_parameters(optimizer: Any) -> list[nn.Parameter]:
    """Parameters the optimizer updates now (text-encoder ones drop out once it stops)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def text_encoder_trains(optimizer: Any) -> bool:
    """Whether some text-encoder parameter group still trains."""
    return any(
        str(group.get("name", "")).startswith(TEXT_ENCODER_GROUP)
        and any(p.requires_grad for p in group["params"])
        for group in optimizer.param_groups
    )


def stop_text_encoder(optimizer: Any) -> int:
    """Freeze the text-encoder groups (``stop_text_encoder_training``); returns the count frozen.

    Frozen parameters get no gradient, so every optimizer leaves them (and their state) alone.
    """
    frozen = 0
    for group in optimizer.param_groups:
        if str(group.get("name", "")).startswith(TEXT_ENCODER_GROUP):
            for p in group["params"]:
                p.requires_grad_(False)
                p.grad = None
                frozen += 1
    return frozen


@dataclass(frozen=True)
class UpdateResult:
    """What one optimizer update did.

    Attributes:
        skipped: fp16 grad scaling found inf/NaN gradients and skipped the update.
        max_norm: max-norm regularisation result, when ``scale_weight_norms`` is set.
        grad_norm: total L2 norm of the gradients before clipping (0-dim tensor, unscaled),
            ``None`` without trainable parameters.
    """

    skipped: bool
    max_norm: MaxNormResult | None
    grad_norm: torch.Tensor | None = None


def apply_update(
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
    network: Network,
    params: Iterable[nn.Parameter],
    *,
    max_grad_norm: float,
    scale_weight_norms: float | None,
) -> UpdateResult:
    """Clip, step the optimizer and scheduler, clear gradients, then max-norm (sd-scripts' order).

    The scheduler does not step when fp16 scaling skipped the update (as accelerate does). The
    pre-clip gradient norm is what clipping returns; without clipping it is computed alone.
    """
    params = list(params)
    grad_norm = None
    if max_grad_norm and params:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    elif params:
        grad_norm = unclipped_grad_norm(params, getattr(accelerator, "scaler", None))
    optimizer.step()
    skipped = bool(getattr(optimizer, "step_was_skipped", False))
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    max_norm = network.apply_max_norm(scale_weight_norms) if scale_weight_norms else None
    return UpdateResult(skipped, max_norm, grad_norm)


def unclipped_grad_norm(params: list[nn.Parameter], scaler: Any = None) -> torch.Tensor | None:
    """Total L2 norm of the gradients (as ``clip_grad_norm_`` computes it), divided by the fp16
    loss scale when a grad scaler scaled them; ``None`` when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    if scaler is not None and scaler.is_enabled():
        norm = norm / scaler.get_scale()
    return norm


def group_learning_rates(optimizer: Any, scheduler: Any) -> dict[str, float]:
    """Current learning rate of each named parameter group (``unet``, ``textencoder``, …).

    Taken from the scheduler (Adafactor's relative-step schedule computes them); adaptive
    optimizers (D-Adaptation, Prodigy) report ``d * lr``, their effective step size.
    """
    groups = optimizer.param_groups
    last = list(scheduler.get_last_lr()) if hasattr(scheduler, "get_last_lr") else []
    if len(last) != len(groups):
        last = [group.get("lr") or 0.0 for group in groups]
    rates: dict[str, float] = {}
    for index, (group, lr) in enumerate(zip(groups, last, strict=True)):
        name = str(group.get("name", f"group{index}"))
        rates[name] = float(lr or 0.0) * float(group.get("d", 1.0))
    return rates
