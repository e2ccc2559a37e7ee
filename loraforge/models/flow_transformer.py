"""Calling the SD3 / FLUX.1 transformers on latents (the one place that knows their inputs).

FLUX works on packed latents: ``(B, 16, H, W)`` -> ``(B, H/2 * W/2, 64)`` 2x2 patches, with
position ids ``(H/2 * W/2, 3)`` = ``(0, row, column)`` for the image tokens and zeros for the text
tokens (sd-scripts' ``flux_utils.pack_latents`` / ``prepare_img_ids``, diffusers'
``FluxPipeline._pack_latents``). Its timestep input is ``sigma`` (``t / 1000``) and FLUX.1 dev's
guidance input the guidance scale. SD3 takes latents as they are and the timestep ``1000 * sigma``.
"""

from __future__ import annotations

from typing import Any

import torch

from loraforge.models.prompts import PromptEmbeds


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, C * 4)`` 2x2 patches (channel-major inside a patch)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, d = packed.shape
    c = d // 4
    x = packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's ``(H/2 * W/2, 3)`` image position ids ``(0, row, column)``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def denoise(
    transformer: Any,
    family: str,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: PromptEmbeds,
    *,
    guidance: float | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The transformer's output for ``(B, 16, H, W)`` noisy latents, shaped like them.

    Args:
        transformer: ``FluxTransformer2DModel`` or ``SD3Transformer2DModel``.
        family: ``flux`` or ``sd3``.
        noisy: the noisy latents.
        timesteps: ``(B,)`` ``1000 * sigma``.
        embeds: the prompt embeddings (``hidden`` and ``pooled``).
        guidance: FLUX.1 dev's guidance input (``None`` for schnell / SD3).
        dtype: the compute dtype of the inputs.
    """
    hidden = embeds.hidden.to(dtype)
    pooled = embeds.pooled.to(dtype) if embeds.pooled is not None else None
    if family == "sd3":
        return transformer(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            timestep=timesteps.to(dtype),
            return_dict=False,
        )[0]
    b, _, h, w = noisy.shape
    guidance_in = None
    if getattr(transformer.config, "guidance_embeds", False):
        value = 1.0 if guidance is None else guidance
        guidance_in = torch.full((b,), value, device=noisy.device, dtype=dtype)
    out = transformer(
        hidden_states=pack_latents(noisy).to(dtype),
        encoder_hidden_states=hidden,
        pooled_projections=pooled,
        timestep=(timesteps / 1000).to(dtype),
        img_ids=image_ids(h, w, noisy.device, dtype),
        txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype),
        guidance=guidance_in,
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)
