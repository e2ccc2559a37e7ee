"""Sample images from SD3 / FLUX with the flow-matching Euler scheduler (``sample.sampler`` is
not used for these families: like sd-scripts, they always sample with
``FlowMatchEulerDiscreteScheduler``).

FLUX.1 dev takes ``cfg_scale`` as its distilled guidance input and runs one transformer call per
step (sd-scripts' ``--g``); schnell has no guidance; SD3 uses classifier-free guidance with the
negative prompt. FLUX's schedule is shifted by the image size (``use_dynamic_shifting``, diffusers'
``calculate_shift``), SD3's by the scheduler's fixed ``shift``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loraforge.models.flow_transformer import denoise


def flow_scheduler(
    config: Any, steps: int, latent_hw: tuple[int, int], device: torch.device
) -> Any:
    """A ``FlowMatchEulerDiscreteScheduler`` set to ``steps`` for latents of ``latent_hw``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    settings = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(settings)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if scheduler.config.get("use_dynamic_shifting", False):
        h, w = latent_hw
        seq_len = (h // 2) * (w // 2)
        c = scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = seq_len * slope + (c.base_shift - slope * c.base_image_seq_len)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    return scheduler


@torch.no_grad()
def render_flow(models: Any, spec: Any, device: torch.device, autocast: Callable) -> torch.Tensor:
    """Denoise one sample; returns ``(3, H, W)`` pixels in [-1, 1] (float, CPU or device)."""
    transformer, family = models.unet, models.family
    height, width = spec.height // 16 * 16, spec.width // 16 * 16
    channels = models.vae.config.latent_channels
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    latents = torch.randn((1, channels, height // 8, width // 8), generator=generator).to(device)
    scheduler = flow_scheduler(models.scheduler_config, spec.steps, latents.shape[-2:], device)
    guided = family == "sd3" and spec.cfg_scale > 1.0
    with autocast():
        prompts = [spec.negative or "", spec.prompt] if guided else [spec.prompt]
        embeds = models.conditioning.encode(prompts)
        for t in scheduler.timesteps:
            batch = torch.cat([latents] * len(prompts))
            timesteps = t.expand(batch.shape[0]).float()
            out = denoise(
                transformer,
                family,
                batch,
                timesteps,
                embeds,
                guidance=spec.cfg_scale,
                dtype=models.weight_dtype,
            ).float()
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + spec.cfg_scale * (text - uncond)
            latents = scheduler.step(out, t, latents).prev_sample
    vae = models.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = latents / vae.config.scaling_factor + shift
    return vae.decode(scaled.to(vae.device, vae.dtype)).sample[0].float()
