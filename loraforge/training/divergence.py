"""What to tell the user when the loss stops being finite: what was saved, and the likely cause.

The recipe values that commonly make a run diverge are found when the run is set up
(:func:`suspect_values`); the error names them instead of blaming the learning rate for all.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import TrainingError
from loraforge.recipe import Recipe
from loraforge.recipe.capabilities import ADAPTIVE_OPTIMIZERS

_HIGH_LR = 1e-2  # far above the 1e-4 .. 1e-3 LoRA training uses with non-adaptive optimizers
_ALPHA_RATIO = 4.0  # alpha / dim: the scale of the LoRA's output (kohya's default is 1 or 0.5)


def suspect_values(recipe: Recipe) -> tuple[str, ...]:
    """Recipe values that are likely to make the loss diverge, each named with its field."""
    n, t = recipe.network, recipe.training
    found = []
    for alpha_field, alpha, dim_field, dim in (
        ("network.alpha", n.alpha, "network.dim", n.dim),
        ("network.conv_alpha", n.conv_alpha, "network.conv_dim", n.conv_dim),
    ):
        if alpha is not None and dim and alpha / dim > _ALPHA_RATIO:
            found.append(
                f"{alpha_field} {alpha:g} is {alpha / dim:g}x {dim_field} {dim} (the LoRA's "
                "output is scaled by alpha/dim; alpha at most dim is usual)"
            )
    if t.optimizer not in ADAPTIVE_OPTIMIZERS:
        for field, value in (
            ("training.learning_rate", t.learning_rate),
            ("training.unet_lr", t.unet_lr),
            ("training.text_encoder_lr", t.text_encoder_lr),
        ):
            if value is not None and value > _HIGH_LR:
                found.append(f"{field} {value:g} is very high for {t.optimizer} (1e-4 is usual)")
    if n.loraplus_lr_ratio is not None and n.loraplus_lr_ratio > 64:
        found.append(f"network.loraplus_lr_ratio {n.loraplus_lr_ratio:g} (16 is usual)")
    if t.mixed_precision == "fp16" and not t.max_grad_norm:
        found.append("training.mixed_precision fp16 without max_grad_norm (use bf16, or clip)")
    return tuple(found)


def divergence_error(
    loss: float,
    step: int,
    *,
    saved_lora: Path | None,
    saved_state: Path | None,
    suspects: tuple[str, ...],
) -> TrainingError:
    """The error that stops a run whose loss became ``loss`` (NaN or infinite) at ``step``."""
    if saved_lora is None and saved_state is None:
        kept = "nothing was saved yet"
    else:
        parts = [f"last LoRA file {saved_lora}" if saved_lora else None]
        parts.append(f"resumable state {saved_state}" if saved_state else None)
        kept = "kept: " + " and ".join(p for p in parts if p)
    message = (
        f"the loss became {loss} at step {step}; training stopped before updating the weights "
        f"({kept})"
    )
    if suspects:
        hint = "likely cause: " + "; ".join(suspects) + ". Change it and train again"
    elif step == 1:
        hint = (
            "the loss was not finite before any update, so the learning rate is not the cause: "
            "check the base model and its VAE (an fp16 VAE overflows), and the images"
        )
    else:
        hint = "lower the learning rate, use bf16 instead of fp16, or set max_grad_norm"
    return TrainingError(message, hint=hint)
