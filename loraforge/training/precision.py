"""Dtypes, attention kernels and activation checkpointing of the frozen models.

Which dtype each part of a run gets is decided by :func:`loraforge.training.dtypes.dtype_plan`
(shared with the VRAM estimate); this module applies it to real modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.errors import DependencyError, TrainingError
from loraforge.training.dtypes import dtype_plan, torch_dtype

if TYPE_CHECKING:
    from loraforge.recipe import TrainingConfig


@dataclass(frozen=True)
class Precision:
    """Every dtype of a run, as torch dtypes.

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
    """Read the precision fields of ``training`` (the rules: :func:`dtype_plan`).

    Args:
        training: the recipe's training section.
        save_precision: ``output.save_precision`` (``fp16`` | ``bf16`` | ``fp32``).
    """
    plan = dtype_plan(training, save_precision)
    return Precision(
        mixed_precision=training.mixed_precision,
        weight_dtype=torch_dtype(plan.compute),
        fp8_base=plan.fp8_base,
        network_dtype=torch_dtype(plan.network),
        save_dtype=torch_dtype(plan.save),
    )


def cast_parameters(module: nn.Module, dtype: torch.dtype, *, only: tuple[type, ...] = ()) -> None:
    """Cast floating parameters to ``dtype`` in place, keeping each ``Parameter`` object.

    Unlike ``module.to(dtype)`` this also works on fake tensors (the VRAM trace), whose
    parameters ``Module._apply`` cannot swap.

    Args:
        module: the module tree.
        dtype: the new dtype.
        only: cast only the parameters of modules of these classes (default: all).
    """
    for sub in module.modules():
        if only and not isinstance(sub, only):
            continue
        for param in sub._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


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
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in layers:
        cast_parameters(layer, torch.float8_e4m3fn)
    return len(layers)


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

    The SD3 / FLUX transformers keep their own processors (joint attention, rotary embeddings),
    which already call SDPA; ``eager`` then applies to the text encoders only.
    """
    if type(unet).__name__ in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
        if attention == "eager":
            for encoder in text_encoders:
                if hasattr(encoder, "set_attn_implementation"):
                    encoder.set_attn_implementation("eager")
        if attention != "xformers":
            return
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


def enable_gradient_checkpointing(
    unet: Any,
    text_encoders: Sequence[Any],
    context_fn: Callable[[], tuple[Any, Any]] | None = None,
) -> None:
    """Recompute activations in backward (non-reentrant, so LoRA inputs need no grad).

    The models are put in ``train()`` mode: transformers checkpoints only while training, and
    neither model uses dropout (its rate is 0), so the outputs do not change.

    Args:
        unet, text_encoders: the models to checkpoint.
        context_fn: ``torch.utils.checkpoint``'s ``context_fn`` (the VRAM trace re-enters its
            CUDA autocast policy in the recomputation with it); default none.
    """
    import functools

    extra = {} if context_fn is None else {"context_fn": context_fn}
    if extra:
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

        def checkpointed(module: Any, *args: Any) -> Any:
            return checkpoint(module.__call__, *args, **extra)

        unet.enable_gradient_checkpointing(checkpointed)
    else:
        unet.enable_gradient_checkpointing()
    unet.train()
    for encoder in text_encoders:
        kwargs = {"use_reentrant": False, **extra}
        if hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        encoder.train()
