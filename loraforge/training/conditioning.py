"""What the UNet is conditioned on for one batch: latents, text embeddings, SDXL size ids.

Latents and text embeddings come from the caches (:mod:`loraforge.data.cache`) when the recipe
asks for them and from the VAE / text encoders otherwise ("live"); both paths give the same
quantities (latents already multiplied by the VAE scaling factor), so the loss step does not
know which one it got.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.data.cache import LatentCache, TextCache, encode_pixels
from loraforge.data.dataset import masks_to_size
from loraforge.models.prompts import PromptEmbeds, encode_prompts


@dataclass(frozen=True)
class TextEncoding:
    """How captions become embeddings (the recipe's model options)."""

    family: str
    clip_skip: int
    max_token_length: int


class Conditioning:
    """Latents and prompt embeddings for batches.

    Args:
        vae: the VAE (used when ``latent_cache`` is ``None``).
        text_encoders, tokenizers: used when ``text_cache`` is ``None``.
        encoding: family, clip_skip, max_token_length.
        device: where the results go (the UNet's device).
        latent_cache: cached latents, or ``None`` to encode every batch.
        text_cache: cached embeddings, or ``None`` to encode every batch.
    """

    def __init__(
        self,
        vae: Any,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        encoding: TextEncoding,
        device: torch.device,
        *,
        latent_cache: LatentCache | None = None,
        text_cache: TextCache | None = None,
    ) -> None:
        self.vae = vae
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.encoding = encoding
        self.device = device
        self.latent_cache = latent_cache
        self.text_cache = text_cache

    def latents(self, batch: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
        """``(B, C, H/8, W/8)`` scaled latents of the batch's images (float32; C is 4, or 16 for
        SD3 / FLUX)."""
        if self.latent_cache is not None:
            latents = self.latent_cache.batch(batch["keys"], batch["flipped"])
        else:
            latents = encode_pixels(self.vae, batch["images"], generator)
        return latents.to(self.device, torch.float32, non_blocking=True)

    def masks(self, batch: Mapping[str, Any], size: tuple[int, int]) -> torch.Tensor:
        """``(B, 1, h, w)`` loss masks of the batch at latent size ``(h, w)`` (float32): from
        the latent cache, or the batch's pixel masks averaged down."""
        if self.latent_cache is not None:
            masks = self.latent_cache.masks(batch["keys"], batch["flipped"])
        else:
            masks = batch["masks"]
        masks = masks_to_size(masks.to(torch.float32), size)
        return masks.to(self.device, non_blocking=True)

    def text(self, captions: Sequence[str], *, with_grad: bool) -> PromptEmbeds:
        """Prompt embeddings of training ``captions`` (from the cache when there is one);
        ``with_grad`` when text-encoder adapters train."""
        if self.text_cache is not None and not with_grad:
            embeds = self.text_cache.batch(captions)
            pooled = None if embeds.pooled is None else embeds.pooled.to(self.device)
            return PromptEmbeds(embeds.hidden.to(self.device), pooled)
        return self.encode(captions, with_grad=with_grad)

    def encode(self, prompts: Sequence[str], *, with_grad: bool = False) -> PromptEmbeds:
        """Encode ``prompts`` with the text encoders, wherever they are (sample prompts are
        never in the cache); the result is on :attr:`device`."""
        with torch.set_grad_enabled(with_grad):
            embeds = encode_prompts(
                self.text_encoders,
                self.tokenizers,
                self.encoding.family,
                list(prompts),
                clip_skip=self.encoding.clip_skip,
                max_token_length=self.encoding.max_token_length,
            )
        pooled = None if embeds.pooled is None else embeds.pooled.to(self.device)
        return PromptEmbeds(embeds.hidden.to(self.device), pooled)


def sdxl_size_ids(batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """SDXL's ``time_ids`` for a batch: ``(B, 6)`` = original (h, w), crop (top, left),
    target (h, w), as :func:`loraforge.models.prompts.sdxl_time_ids` lays them out."""
    parts = (batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
    return torch.cat([p.reshape(-1, 2) for p in parts], dim=1).to(device, torch.float32)


def unet_conditioning(
    embeds: PromptEmbeds, size_ids: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, Any]:
    """Keyword arguments for the UNet call: ``encoder_hidden_states`` (+ SDXL's added ids)."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds.hidden.to(dtype)}
    if embeds.pooled is not None:
        if size_ids is None:
            raise ValueError("an SDXL UNet needs size ids with the pooled embedding")
        kwargs["added_cond_kwargs"] = {
            "text_embeds": embeds.pooled.to(dtype),
            "time_ids": size_ids.to(dtype),
        }
    return kwargs
