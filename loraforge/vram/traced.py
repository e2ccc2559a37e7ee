"""The traced estimate: a real training step on full-size fake tensors, measured.

The architecture is built under ``FakeTensorMode`` (shapes and dtypes, no memory), the recipe's
network is created and hooked by its real backend, and ``train``'s own optimizer step runs once
in steady state (:mod:`loraforge.vram.step`): conditioning, noise, the recipe's loss, backward,
clipping, the optimizer and scheduler, with the recipe's precision, checkpointing, attention and
caching. :class:`~loraforge.vram.tracker.LiveBytesTracker` records the peak of
live tensor bytes and what was alive at that moment, which become the rows.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Mapping

from loraforge.recipe.types import Recipe
from loraforge.vram.arch import Architecture
from loraforge.vram.overhead import estimate_with_overheads
from loraforge.vram.result import VramEstimate, VramRow
from loraforge.vram.settings import MemorySettings
from loraforge.vram.sizes import format_bytes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library deprecation chatter while building models that nobody will use."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        # stdout carries the report (and JSON): library chatter goes to stderr
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def trace_step(
    recipe: Recipe, arch: Architecture, settings: MemorySettings, *, cuda_policy: bool = True
):
    """Run ``train``'s step once on full-size fake tensors and measure it.

    Args:
        cuda_policy: autocast as on a GPU (the estimate); ``False`` as a CPU run does.

    Returns:
        :class:`loraforge.vram.step.StepMeasurement`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from loraforge.vram.step import run_training_step
    from loraforge.vram.tracker import LiveBytesTracker

    with _quiet(), FakeTensorMode(allow_non_fake_inputs=True):
        return run_training_step(
            recipe, arch, settings, LiveBytesTracker(), cuda_policy=cuda_policy
        )


def _row_label(category: str, s: MemorySettings) -> tuple[str, str]:
    """``(component, kind)`` for a tracker category."""
    if category.startswith("text encoder ") and category.endswith(" weights"):
        return f"{category} ({s.text_encoder_dtype})", "resident"
    labels = {
        "unet weights": (f"UNet weights ({s.unet_dtype})", "resident"),
        "vae weights": (f"VAE weights ({s.vae_dtype})", "resident"),
        "network weights": (f"network weights ({s.network_dtype})", "resident"),
        "optimizer state": (f"optimizer state ({s.optimizer})", "resident"),
        "ema weights": ("EMA weights (fp32)", "resident"),
        "gradients": (f"gradients ({s.network_dtype})", "step"),
        "unet activations": ("UNet activations", "step"),
        "text encoder activations": ("text-encoder activations", "step"),
        "inputs": ("inputs and loss", "step"),
        "vae encode": ("VAE encode (transient)", "step"),
        "optimizer step": ("optimizer step temporaries", "step"),
    }
    component, kind = labels.get(category, (category, "step"))
    if s.family in ("sd3", "flux"):  # the denoiser is a transformer
        component = component.replace("UNet", "transformer")
    return component, kind


_ORDER = (
    "unet weights",
    "text encoder 1 weights",
    "text encoder 2 weights",
    "vae weights",
    "network weights",
    "optimizer state",
    "ema weights",
    "gradients",
    "vae encode",
    "text encoder activations",
    "unet activations",
    "inputs",
    "optimizer step",
)


def _rows(at_peak: Mapping[str, int], s: MemorySettings, trainable: int) -> list[VramRow]:
    rows = []
    for category in sorted(at_peak, key=lambda c: _ORDER.index(c) if c in _ORDER else 99):
        component, kind = _row_label(category, s)
        note = ""
        if category == "unet activations":
            gc = "on" if s.gradient_checkpointing else "off"
            note = (
                f"{s.width}x{s.height}, batch {s.batch_size}, checkpointing {gc}, "
                f"{s.attention} attention"
            )
        elif category == "network weights":
            note = f"{trainable / 1e6:.1f}M trainable params"
        elif category == "optimizer state":
            from loraforge.vram.optimizers import stands_in

            note = (
                "stand-in with the optimizer's state bytes per parameter"
                if stands_in(s.optimizer)
                else "measured"
            )
        rows.append(VramRow(component, at_peak[category], note, kind))  # type: ignore[arg-type]
    if s.ema_device == "cpu":
        rows.append(VramRow("EMA weights", 0, "ema.device cpu: kept off the GPU", "info"))
    if not s.text_encoders_on_gpu:
        rows.append(VramRow("text encoder weights", 0, "outputs cached: kept off the GPU", "info"))
    if not s.vae_on_gpu:
        rows.append(VramRow("VAE weights", 0, "latents cached: kept off the GPU", "info"))
    return rows


def traced_estimate(recipe: Recipe, arch: Architecture, s: MemorySettings) -> VramEstimate:
    """Estimate ``recipe`` by tracing one full-size step on fake tensors (CPU, seconds)."""
    measured = trace_step(recipe, arch, s)
    rows = _rows(measured.at_peak, s, measured.trainable_params)
    notes = [
        f"peak of live tensors {format_bytes(measured.peak_bytes)} measured through one steady-state "
        "step of train (conditioning, loss, backward, clipping, optimizer) on fake tensors",
    ]
    if s.family in ("sd3", "flux") and recipe.training.cpu_offload_checkpointing:
        notes.append(
            "cpu_offload_checkpointing moves nothing in a CPU trace: the block inputs it keeps "
            "off the GPU are counted here (the analytic method leaves them out)"
        )
    return estimate_with_overheads("traced", s, arch, rows, measured.peak_bytes, notes)
