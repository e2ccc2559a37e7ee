"""Dtypes, attention kernels and activation checkpointing of the frozen models.

The placement rules mirror sd-scripts' ``train_network.py`` (and :mod:`loraforge.vram.settings`,
which estimates memory with the same rules):

* the frozen UNet and text encoders hold their weights in the mixed-precision dtype (fp32 for
  ``mixed_precision: no``); ``fp8_base`` stores their Linear and Conv2d weights in float8 (e4m3)
  and computes in the mixed-precision dtype through autocast (norms and embeddings keep the
  mixed-precision dtype: torch cannot normalise in float8);
* the VAE runs in the dtype ``loraforge cache`` encodes with
  (:func:`loraforge.data.cache_setup.vae_dtype`), so cached latents stay valid;
* the network's parameters are fp32 unless ``full_fp16`` / ``full_bf16``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.errors import DependencyError, TrainingError

if TYPE_CHECKING:
    from loraforge.recipe import TrainingConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MIXED = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """Every dtype of a run.

    Attributes:
        mixed_precision: ``no`` | ``fp16`` | ``bf16`` (accelerate's autocast and grad scaling).
        weight_dtype: dtype of the frozen UNet / text-encoder weights and of their inputs.
        fp8_base: Linear/Conv2d weights of the UNet and text encoders stored as float8 e4m3.
        network_dtype: dtype of the trainable parameters (and their gradients).
        save_dtype: dtype of the saved LoRA tensors.
    """

    mixed_precision: str
    weight_dtype: torch.dtype
    fp8_base: bool
    network_dtype: torch.dtype
    save_dtype: torch.dtype


def resolve_precision(training: TrainingConfig, save_precision: str) -> Precision:
    """Read the precision fields of ``training``.

    Args:
        training: the recipe's training section.
        save_precision: ``output.save_precision`` (``fp16`` | ``bf16`` | ``fp32``).
    """
    weight = _MIXED[training.mixed_precision]
    network = weight if (training.full_fp16 or training.full_bf16) else torch.float32
    return Precision(
        mixed_precision=training.mixed_precision,
        weight_dtype=weight,
        fp8_base=training.fp8_base,
        network_dtype=network,
        save_dtype=DTYPES[save_precision],
    )


def check_precision_on_device(precision: Precision, device: torch.device) -> None:
    """Refuse precisions the device cannot run, naming the fix.

    Raises:
        TrainingError: fp16 on a CPU (no fp16 autocast there).
        DependencyError: fp8 base weights that this torch cannot compute with on ``device``.
    """
    if precision.mixed_precision == "fp16" and device.type == "cpu":
        raise TrainingError(
            "training.mixed_precision fp16 needs a GPU, and this run is on the CPU",
            hint="use mixed_precision: bf16 or no on the CPU (the demo recipes use no)",
        )
    if precision.fp8_base:
        _probe_fp8(precision.weight_dtype, device)


def _probe_fp8(compute_dtype: torch.dtype, device: torch.device) -> None:
    """Run one float8-weight Linear and Conv2d under autocast, as training will."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    problem = None if fp8 is not None else "this torch has no float8 dtype"
    if fp8 is not None:
        try:
            linear = nn.Linear(16, 16, device=device).to(fp8)
            conv = nn.Conv2d(16, 16, 3, padding=1, device=device).to(fp8)
            with torch.autocast(device.type, dtype=compute_dtype):
                x = linear(torch.randn(2, 16, device=device, dtype=compute_dtype))
                conv(x.reshape(2, 16, 1, 1))
        except (RuntimeError, TypeError, NotImplementedError) as e:
            problem = str(e).splitlines()[0]
    if problem is not None:
        raise DependencyError(
            f"training.fp8_base: torch {torch.__version__} cannot compute with float8 weights "
            f"on {device.type} ({problem})",
            hint="set fp8_base: false, or use a newer torch on a GPU that supports it",
        )


def store_fp8(module: nn.Module) -> int:
    """Cast the weights of every Linear and Conv2d in ``module`` to float8 e4m3, in place.

    Returns:
        How many layers were cast.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            layer.to(torch.float8_e4m3fn)
            count += 1
    return count


def move_module(
    module: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> None:
    """``module.to(device, dtype)`` without diffusers' warning about casting after loading
    (loraforge keeps no module in float32 on purpose, so the warning has nothing to say)."""
    from diffusers.utils import logging as diffusers_logging

    kwargs: dict[str, Any] = {} if device is None else {"device": device}
    first = next(module.parameters(), None)
    if dtype is not None and (first is None or first.dtype != dtype):
        kwargs["dtype"] = dtype
    if not kwargs:
        return
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(**kwargs)
    finally:
        diffusers_logging.set_verbosity(level)


def cast_frozen_models(
    modules: Sequence[nn.Module], precision: Precision, device: torch.device
) -> None:
    """Move the UNet / text encoders to ``device`` in their training dtypes, in place."""
    for module in modules:
        move_module(module, device, precision.weight_dtype)
        if precision.fp8_base:
            store_fp8(module)


def allow_fp16_gradients(accelerator: Any) -> None:
    """Let accelerate's grad scaler unscale fp16 gradients (``full_fp16``), as sd-scripts'
    ``patch_accelerator_for_fp16_training`` does; torch refuses them by default."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def configure_attention(unet: Any, text_encoders: Sequence[Any], attention: str) -> None:
    """Select the attention kernel: ``sdpa`` (default), ``xformers`` (UNet) or ``eager``.

    Raises:
        DependencyError: ``xformers`` asked for but not installed or not usable.
    """
    if attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        return
    if attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
        for encoder in text_encoders:
            if hasattr(encoder, "set_attn_implementation"):
                encoder.set_attn_implementation("eager")
        return
    try:
        import xformers  # noqa: F401

        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ValueError, RuntimeError) as e:
        raise DependencyError(
            f"training.attention xformers: xformers is not usable here ({e})",
            hint="pip install xformers (needs a CUDA GPU), or use attention: sdpa",
        ) from e


def enable_gradient_checkpointing(unet: Any, text_encoders: Sequence[Any]) -> None:
    """Recompute activations in backward (non-reentrant, so LoRA inputs need no grad).

    The models are put in ``train()`` mode: transformers checkpoints only while training, and
    neither model uses dropout (its rate is 0), so the outputs do not change.
    """
    unet.enable_gradient_checkpointing()
    unet.train()
    for encoder in text_encoders:
        kwargs = {"use_reentrant": False}
        if hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        encoder.train()
