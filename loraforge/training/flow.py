"""Rectified-flow training for the SD3 and FLUX.1 transformers: noise levels, inputs, targets.

One module for both families, following kohya-ss/sd-scripts (``library/flux_train_utils``
``get_noisy_model_input_and_timesteps`` / ``apply_model_prediction_type``, ``library/
sd3_train_utils``) and diffusers' ``training_utils`` (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``):

* a noise level ``sigma`` in (0, 1) per image, drawn by ``timestep_sampling``; the noisy input is
  ``(1 - sigma) * latents + sigma * noise`` and the timestep ``1000 * sigma``;
* the target is the velocity ``noise - latents`` (``raw``/``additive``), or the clean latents with
  the output preconditioned as ``-sigma * output + noisy`` (``sigma_scaled``, SD3's way), whose
  loss is weighted by ``weighting_scheme``.

Every draw goes through the batch's :class:`torch.Generator` (on its own device, then moved), so
a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraforge.recipe import TrainingConfig

NUM_TRAIN_TIMESTEPS = 1000
#: sd-scripts' recommended ``discrete_flow_shift`` for FLUX.1 LoRAs (docs/flux_train_network.md)
FLUX_DEFAULT_SHIFT = 3.1582


@dataclass(frozen=True)
class FlowOptions:
    """The recipe's flow-matching fields with the family defaults resolved.

    Attributes:
        timestep_sampling: ``sigma`` | ``uniform`` | ``sigmoid`` | ``shift`` | ``flux_shift`` |
            ``logit_normal``.
        discrete_flow_shift: the shift ``s`` of ``s*t / (1 + (s-1)*t)``.
        sigmoid_scale: scale of the normal draw before the sigmoid.
        model_prediction_type: ``raw`` | ``additive`` | ``sigma_scaled``.
        weighting_scheme: density (``sigma``) and loss weighting (``sigma_scaled``).
        logit_mean, logit_std, mode_scale: parameters of the densities.
        guidance: FLUX dev's guidance input, ``None`` for models without one.
        min_timestep, max_timestep: range of ``1000 * sigma`` for the ``sigma`` sampling.
        ip_noise_gamma, ip_noise_gamma_random_strength: input perturbation noise.
        descending_density: ``sigma`` sampling reads the density's ``u`` as ``1 - sigma``, as
            sd-scripts' FLUX trainer does (it indexes the scheduler's descending timesteps with
            ``u``; its SD3 trainer uses ``u`` as the noise level).
    """

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    model_prediction_type: str = "raw"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float | None = None
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    descending_density: bool = False

    @classmethod
    def from_training(
        cls, training: TrainingConfig, family: str, *, guided: bool = False
    ) -> FlowOptions:
        """The recipe's fields, with null ones taken from the family (FLUX: ``shift`` sampling
        with shift 3.1582 and ``raw`` output; SD3: ``sigma`` sampling, shift 1.0, and
        ``sigma_scaled``, as sd3_train_network).

        Args:
            training: the recipe's ``training`` section.
            family: ``flux`` or ``sd3``.
            guided: the transformer takes a guidance input (FLUX.1 dev).
        """
        flux = family == "flux"
        sampling = training.timestep_sampling or ("shift" if flux else "sigma")
        shift = training.discrete_flow_shift
        prediction = training.model_prediction_type or ("raw" if flux else "sigma_scaled")
        return cls(
            timestep_sampling=sampling,
            discrete_flow_shift=shift
            if shift is not None
            else (FLUX_DEFAULT_SHIFT if flux else 1.0),
            sigmoid_scale=training.sigmoid_scale,
            model_prediction_type=prediction,
            weighting_scheme=training.weighting_scheme,
            logit_mean=training.logit_mean,
            logit_std=training.logit_std,
            mode_scale=training.mode_scale,
            guidance=training.guidance_scale if guided else None,
            min_timestep=training.min_timestep,
            max_timestep=training.max_timestep,
            ip_noise_gamma=training.ip_noise_gamma,
            ip_noise_gamma_random_strength=training.ip_noise_gamma_random_strength,
            descending_density=flux,
        )


@dataclass(frozen=True)
class FlowBatch:
    """One flow-matching draw for a batch.

    Attributes:
        noise: ``(B, C, H, W)`` standard normal noise.
        noisy: ``(B, C, H, W)`` the transformer input ``(1 - sigma) * latents + sigma * noise``.
        sigmas: ``(B, 1, 1, 1)`` noise levels in [0, 1].
        timesteps: ``(B,)`` ``1000 * sigma`` (float).
    """

    noise: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``s * t / (1 + (s - 1) * t)``: the discrete flow shift (SD3 paper, eq. 23)."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def flux_time_shift(sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """FLUX's resolution-dependent shift: ``mu`` linear from 0.5 at 256 tokens to 1.15 at 4096,
    ``exp(mu) / (exp(mu) + 1/t - 1)`` (sd-scripts' ``time_shift(get_lin_function(...))``)."""
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = slope * image_seq_len + (0.5 - slope * 256)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def timestep_density(
    scheme: str,
    batch_size: int,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """``u`` in [0, 1] drawn from the ``weighting_scheme``'s density (diffusers'
    ``compute_density_for_timestep_sampling``): logit-normal, ``mode`` (SD3 paper eq. 20) or
    uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(_randn((batch_size,), generator) * logit_std + logit_mean)
    u = _rand((batch_size,), generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(
    options: FlowOptions, batch_size: int, latent_hw: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """``(B,)`` noise levels drawn as ``options.timestep_sampling`` says.

    ``sigma`` / ``logit_normal`` quantise ``1000 * sigma`` to whole timesteps in
    ``[min_timestep, max_timestep)`` like sd3_train_utils; the others are continuous, as in
    flux_train_utils.
    """
    sampling = options.timestep_sampling
    if sampling == "uniform":
        return _rand((batch_size,), generator)
    if sampling in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(options.sigmoid_scale * _randn((batch_size,), generator))
        if sampling == "shift":
            return shift_sigmas(sigmas, options.discrete_flow_shift)
        if sampling == "flux_shift":
            h, w = latent_hw
            return flux_time_shift(sigmas, (h // 2) * (w // 2))
        return sigmas
    scheme = "logit_normal" if sampling == "logit_normal" else options.weighting_scheme
    u = timestep_density(
        scheme,
        batch_size,
        generator,
        logit_mean=options.logit_mean,
        logit_std=options.logit_std,
        mode_scale=options.mode_scale,
    )
    if options.descending_density:
        u = 1 - u
    u = shift_sigmas(u, options.discrete_flow_shift)
    span = options.max_timestep - options.min_timestep
    steps = (u * span + options.min_timestep).long().float()
    return steps / NUM_TRAIN_TIMESTEPS


def noisy_flow_input(
    latents: torch.Tensor, options: FlowOptions, generator: torch.Generator
) -> FlowBatch:
    """Draw noise, noise levels and the noisy input for ``(B, C, H, W)`` latents.

    Order of draws (fixed, so a resumed run replays exactly): noise, noise levels,
    input-perturbation strength and noise.
    """
    batch = latents.shape[0]
    noise = _randn(tuple(latents.shape), generator).to(latents.device, latents.dtype)
    sigmas = sample_sigmas(options, batch, tuple(latents.shape[-2:]), generator)
    sigmas = sigmas.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    model_noise = noise
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = float(_rand((1,), generator).item()) * gamma
        xi = _randn(tuple(latents.shape), generator).to(latents.device, latents.dtype)
        model_noise = noise + gamma * xi
    noisy = (1.0 - sigmas) * latents + sigmas * model_noise
    timesteps = sigmas.view(-1) * NUM_TRAIN_TIMESTEPS
    return FlowBatch(noise=noise, noisy=noisy, sigmas=sigmas, timesteps=timesteps)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``compute_loss_weighting_for_sd3``: ``sigma**-2`` (``sigma_sqrt``),
    ``2 / (pi * (1 - 2 sigma + 2 sigma**2))`` (``cosmap``), else ones."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def prediction_and_target(
    output: torch.Tensor, latents: torch.Tensor, draw: FlowBatch, options: FlowOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(prediction, target, weighting)`` for the loss, from the transformer ``output``.

    ``raw``: output vs ``noise - latents``; ``additive``: ``output + noisy`` vs the same;
    ``sigma_scaled``: ``-sigma * output + noisy`` vs ``latents``, weighted per
    :func:`loss_weighting` (``(B, 1, 1, 1)``).
    """
    kind = options.model_prediction_type
    if kind == "sigma_scaled":
        pred = output * (-draw.sigmas) + draw.noisy
        return pred, latents, loss_weighting(options.weighting_scheme, draw.sigmas)
    if kind == "additive":
        output = output + draw.noisy
    return output, draw.noise - latents, None
