"""Forward diffusion for training: the noise schedule, noise variants, timesteps and targets.

Formulas follow kohya-ss/sd-scripts (``library/train_util.get_noise_noisy_latents_and_timesteps``
and ``library/custom_train_functions``) so a recipe trains the way its kohya equivalent does.
Every random draw goes through an explicit :class:`torch.Generator`, so a run is reproducible and
resumable without touching the global RNG. Draws happen on the generator's device and are then
moved to the latents' device, so a CPU generator gives the same numbers whatever the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loraforge.errors import RecipeError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from loraforge.recipe import TrainingConfig

# The training noise schedule of SD 1.x / 2.x / XL; sd-scripts uses these values for every family
# instead of the model's own scheduler config.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training scheduler plus the SNR table the loss weights read.

    Attributes:
        scheduler: a diffusers ``DDPMScheduler`` (``add_noise`` / ``get_velocity``).
        all_snr: ``(num_train_timesteps,)`` float32 CPU tensor,
            SNR(t) = alpha_bar / (1 - alpha_bar).
    """

    scheduler: DDPMScheduler
    all_snr: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod


@dataclass(frozen=True)
class NoiseOptions:
    """How noise and timesteps are drawn (the recipe's ``training`` noise fields).

    Defaults mean "plain DDPM noise, all timesteps".
    """

    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_training(cls, training: TrainingConfig) -> NoiseOptions:
        """Take the noise fields of the recipe's ``training`` section."""
        return cls(
            noise_offset=training.noise_offset,
            noise_offset_random_strength=training.noise_offset_random_strength,
            adaptive_noise_scale=training.adaptive_noise_scale,
            multires_noise_iterations=training.multires_noise_iterations,
            multires_noise_discount=training.multires_noise_discount,
            ip_noise_gamma=training.ip_noise_gamma,
            ip_noise_gamma_random_strength=training.ip_noise_gamma_random_strength,
            min_timestep=training.min_timestep,
            max_timestep=training.max_timestep,
        )


@dataclass(frozen=True)
class NoisyBatch:
    """One forward-diffusion draw.

    Attributes:
        noise: ``(B, C, H, W)`` the noise the model learns to predict (epsilon target); it does
            not include input-perturbation noise.
        noisy_latents: ``(B, C, H, W)`` the UNet input.
        timesteps: ``(B,)`` int64 on the latents' device.
    """

    noise: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor


def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = (sqrt(alpha_bar) / sqrt(1 - alpha_bar))**2, as float32 on the CPU."""
    alpha = torch.sqrt(alphas_cumprod)
    sigma = torch.sqrt(1.0 - alphas_cumprod)
    return ((alpha / sigma) ** 2).float().cpu()


def rescale_betas_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last timestep has SNR exactly 0 (Lin et al. 2023, arXiv:2305.08891, Alg. 1).

    Shifts sqrt(alpha_bar) so its last value is 0 and rescales it so its first value is unchanged.
    """
    alphas_bar_sqrt = (1.0 - betas).cumprod(0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def fix_noise_scheduler_betas_for_zero_terminal_snr(scheduler: DDPMScheduler) -> None:
    """Rewrite ``scheduler``'s betas, alphas and alphas_cumprod for zero terminal SNR, in place."""
    betas = rescale_betas_zero_terminal_snr(scheduler.betas)
    alphas = 1.0 - betas
    scheduler.betas = betas
    scheduler.alphas = alphas
    scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def build_noise_schedule(zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The training scheduler sd-scripts uses (scaled-linear betas 0.00085..0.012, 1000 steps).

    Args:
        zero_terminal_snr: rescale the betas so SNR(T) = 0 (use with v-prediction).

    The SNR table is taken *before* the zero-terminal-SNR rescale, exactly as sd-scripts'
    ``get_noise_scheduler`` does: the min-SNR / debiased / v-pred-like weights then equal
    kohya's, and the last timestep's weight stays finite instead of dividing by SNR = 0.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
    )
    all_snr = snr_table(scheduler.alphas_cumprod)
    if zero_terminal_snr:
        fix_noise_scheduler_betas_for_zero_terminal_snr(scheduler)
    return NoiseSchedule(scheduler=scheduler, all_snr=all_snr)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws on the generator's device, moved to ``like``'s device and dtype."""
    out = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def _rand_scalar(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device).item())


def random_strength(value: float, randomize: bool, generator: torch.Generator) -> float:
    """``value``, or ``U[0, 1) * value`` when ``randomize`` (the ``*_random_strength`` options)."""
    return _rand_scalar(generator) * value if randomize else value


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float,
    adaptive_noise_scale: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (crosslabs "offset noise").

    ``noise + offset * N(0, 1)`` with one draw per ``(B, C)``; with ``adaptive_noise_scale`` the
    offset becomes ``max(0, offset + scale * |mean_hw(latents)|)`` per sample and channel.

    Args:
        latents: ``(B, C, H, W)``.
        noise: ``(B, C, H, W)``.
        noise_offset: the (possibly randomized) strength.
        adaptive_noise_scale: ``None`` for a fixed offset.
        generator: source of the offset draws.
    """
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, min=0.0)
    draws = _randn((latents.shape[0], latents.shape[1], 1, 1), generator, like=noise)
    return noise + offset * draws


def pyramid_noise_like(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, rescaled to unit standard deviation.

    For ``i`` in ``0..iterations-1``: draw ``r ~ U[2, 4)``, add bilinear-upsampled noise of size
    ``(max(1, H // r**i), max(1, W // r**i))`` weighted ``discount**i``; stop after a 1-pixel level.
    The sum is divided by its standard deviation over the whole batch.

    Args:
        noise: ``(B, C, H, W)``; not modified.
        iterations: number of levels (``multires_noise_iterations``).
        discount: weight decay per level (``multires_noise_discount``).
        generator: source of the level sizes and the level noise.
    """
    b, c, h, w = noise.shape
    total = noise.float()
    for i in range(iterations):
        r = _rand_scalar(generator) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _randn((b, c, hn, wn), generator, like=total)
        total = total + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return (total / total.std()).to(noise.dtype)


def check_timestep_range(min_timestep: int, max_timestep: int, num_train_timesteps: int) -> None:
    """Raise :class:`RecipeError` unless ``0 <= min <= max <= T`` and ``min == max < T``."""
    if not 0 <= min_timestep <= max_timestep <= num_train_timesteps:
        raise RecipeError(
            f"training.min_timestep/max_timestep: {min_timestep}..{max_timestep} is not a range "
            f"inside 0..{num_train_timesteps}",
            hint=f"use 0 <= min_timestep <= max_timestep <= {num_train_timesteps}",
        )
    if min_timestep == max_timestep == num_train_timesteps:
        raise RecipeError(
            f"training.min_timestep = max_timestep = {num_train_timesteps} selects no timestep",
            hint=f"a fixed timestep must be below {num_train_timesteps}",
        )


def sample_timesteps(
    batch_size: int,
    min_timestep: int,
    max_timestep: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)``; ``max_timestep`` when equal.

    Returns:
        ``(batch_size,)`` int64 tensor on ``device``.
    """
    if min_timestep < max_timestep:
        steps = torch.randint(
            min_timestep, max_timestep, (batch_size,), generator=generator, device=generator.device
        )
    else:
        steps = torch.full((batch_size,), max_timestep, dtype=torch.int64)
    return steps.long().to(device)


def add_noise(
    schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise`` (scheduler.add_noise)."""
    noisy = schedule.scheduler.add_noise(latents, noise, timesteps)
    # diffusers moves alphas_cumprod to the latents' device; keep the table on the CPU like
    # sd-scripts so the loss weights and huber schedule index it without device juggling.
    schedule.scheduler.alphas_cumprod = schedule.scheduler.alphas_cumprod.cpu()
    return noisy


def noise_noisy_latents_and_timesteps(
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    options: NoiseOptions,
    generator: torch.Generator,
) -> NoisyBatch:
    """Draw noise (with offset / multires), timesteps and the noisy latents for one batch.

    Order of draws (fixed, so resumed runs replay exactly): noise, offset strength, offset,
    multires levels, timesteps, input-perturbation strength, input-perturbation noise.

    Args:
        latents: ``(B, C, H, W)`` scaled VAE latents.
        schedule: from :func:`build_noise_schedule`.
        options: the recipe's noise fields.
        generator: the one source of randomness.
    """
    noise = _randn(tuple(latents.shape), generator, like=latents)
    if options.noise_offset:
        strength = random_strength(
            options.noise_offset, options.noise_offset_random_strength, generator
        )
        noise = apply_noise_offset(
            latents, noise, strength, options.adaptive_noise_scale, generator
        )
    if options.multires_noise_iterations:
        noise = pyramid_noise_like(
            noise, options.multires_noise_iterations, options.multires_noise_discount, generator
        )
    timesteps = sample_timesteps(
        latents.shape[0], options.min_timestep, options.max_timestep, generator, latents.device
    )
    model_noise = noise
    if options.ip_noise_gamma:
        gamma = random_strength(
            options.ip_noise_gamma, options.ip_noise_gamma_random_strength, generator
        )
        model_noise = noise + gamma * _randn(tuple(latents.shape), generator, like=latents)
    noisy = add_noise(schedule, latents, model_noise, timesteps)
    return NoisyBatch(noise=noise, noisy_latents=noisy, timesteps=timesteps)


def prediction_target(
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_prediction: bool,
) -> torch.Tensor:
    """What the UNet should output: ``noise`` (epsilon), or the velocity
    ``sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents`` for v-prediction."""
    if not v_prediction:
        return noise
    velocity = schedule.scheduler.get_velocity(latents, noise, timesteps)
    schedule.scheduler.alphas_cumprod = schedule.scheduler.alphas_cumprod.cpu()
    return velocity
