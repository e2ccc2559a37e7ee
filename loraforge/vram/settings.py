"""The memory-relevant settings of a recipe, resolved the way training applies them.

Both estimators read a :class:`MemorySettings` instead of the recipe. The dtypes come from
:func:`loraforge.training.dtypes.dtype_plan`, the table ``train`` uses (for a GPU run); the
placement rules mirror sd-scripts' train_network.py:

* cached latents leave the VAE off the GPU; cached text-encoder outputs leave the text
  encoders off it; a text encoder that is not trained runs without gradients;
* the largest training bucket (by area) sets the activation size.

Pure Python; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraforge.data.buckets import make_bucket_resolutions
from loraforge.recipe.types import DatasetConfig, Recipe
from loraforge.training.dtypes import DTYPE_BYTES, dtype_plan, vae_dtype_name

__all__ = ["DTYPE_BYTES", "TOKENS_PER_CHUNK", "MemorySettings", "memory_settings"]
LATENT_FACTOR = 8  # the SD VAE down-samples by 8
TOKENS_PER_CHUNK = 77  # CLIP context; max_token_length 150/225 runs 2/3 chunks


@dataclass(frozen=True)
class MemorySettings:
    """What a training step's memory depends on.

    Attributes:
        family: the resolved model family.
        width, height: the largest bucket in pixels (latents are 1/8 of it).
        batch_size: images per step.
        compute_dtype: ``fp32`` | ``fp16`` | ``bf16`` (autocast dtype; fp32 = no autocast).
        unet_dtype, text_encoder_dtype, vae_dtype: stored weight dtypes (``fp8`` possible).
        network_dtype: dtype of the trainable parameters and their gradients.
        optimizer: canonical optimizer name (``training.optimizer``).
        gradient_checkpointing: recompute activations in backward.
        attention: ``sdpa`` | ``xformers`` | ``eager``.
        train_unet, train_text_encoder: whether each part gets trainable modules with lr > 0.
        vae_on_gpu: latents are encoded live (``cache.latents: none``).
        text_encoders_on_gpu: text-encoder outputs are computed live.
        token_chunks: 77-token chunks per caption (max_token_length / 75).
        max_grad_norm: gradient clipping (0 = off).
        ema_device: where the weight average lives (``same``: on the GPU, ``cpu``), or
            ``None`` without ``training.ema``.
    """

    family: str
    width: int
    height: int
    batch_size: int
    compute_dtype: str
    unet_dtype: str
    text_encoder_dtype: str
    vae_dtype: str
    network_dtype: str
    optimizer: str
    gradient_checkpointing: bool
    attention: str
    train_unet: bool
    train_text_encoder: bool
    vae_on_gpu: bool
    text_encoders_on_gpu: bool
    token_chunks: int
    max_grad_norm: float
    ema_device: str | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(width, height)`` of the latents."""
        return (
            math.ceil(self.width / LATENT_FACTOR),
            math.ceil(self.height / LATENT_FACTOR),
        )


def largest_bucket(dataset: DatasetConfig) -> tuple[int, int]:
    """The training bucket with the largest area, ``(width, height)`` in pixels.

    With bucketing every bucket's area is at most the resolution's area (sd-scripts), so the
    largest predefined bucket is the answer; without bucketing it is the resolution itself.
    ``bucket_no_upscale`` only ever makes buckets smaller, so the predefined maximum bounds it.
    """
    width, height = dataset.resolution
    if not dataset.enable_bucket:
        return int(width), int(height)
    buckets = make_bucket_resolutions(
        (int(width), int(height)),
        dataset.min_bucket_reso,
        dataset.max_bucket_reso,
        dataset.bucket_reso_steps,
    )
    if not buckets:
        return int(width), int(height)
    # largest area; among equals the squarest (eager attention is the same, SDPA too)
    return max(buckets, key=lambda b: (b[0] * b[1], -abs(b[0] - b[1])))


def _text_encoder_trained(recipe: Recipe) -> bool:
    network, training = recipe.network, recipe.training
    if not network.train_text_encoder:
        return False
    lr = (
        training.text_encoder_lr if training.text_encoder_lr is not None else training.learning_rate
    )
    return lr != 0


def _unet_trained(recipe: Recipe) -> bool:
    network, training = recipe.network, recipe.training
    if not network.train_unet:
        return False
    lr = training.unet_lr if training.unet_lr is not None else training.learning_rate
    return lr != 0


def memory_settings(recipe: Recipe, family: str) -> MemorySettings:
    """Resolve ``recipe`` for ``family`` (already resolved from ``auto``)."""
    t = recipe.training
    plan = dtype_plan(t, recipe.output.save_precision)
    trains_te = _text_encoder_trained(recipe)
    width, height = largest_bucket(recipe.dataset)
    return MemorySettings(
        family=family,
        width=width,
        height=height,
        batch_size=t.batch_size,
        compute_dtype=plan.compute,
        unet_dtype=plan.frozen,
        text_encoder_dtype=plan.frozen,
        vae_dtype=vae_dtype_name(t.mixed_precision, family),
        network_dtype=plan.network,
        optimizer=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        attention=t.attention,
        train_unet=_unet_trained(recipe),
        train_text_encoder=trains_te,
        vae_on_gpu=recipe.cache.latents == "none",
        text_encoders_on_gpu=trains_te or recipe.cache.text_encoder_outputs == "none",
        token_chunks=max(1, recipe.model.max_token_length // 75),
        max_grad_norm=float(t.max_grad_norm or 0.0),
        ema_device=t.ema.device if t.ema is not None else None,
    )
