"""The traced VRAM estimate predicts the live tensor bytes of a real ``train`` run within 5%.

A real run trains the tiny model on the CPU for three optimizer steps with a
:class:`~loraforge.vram.probe.MemoryProbe` attached: it measures the peak of live tensor bytes
on the training device over steps 2-3 (the first steady-state steps). The trace runs ``train``'s
step on fake tensors of the same architecture. Everything is in both: frozen weights on the
device, the network, optimizer state, activations, gradients, temporaries. The analytic
formulas must stay within 10% of the trace for the same recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.recipe import load_recipe
from loraforge.training.setup import setup_run
from loraforge.vram.analytic import analytic_estimate
from loraforge.vram.arch import resolve_architecture
from loraforge.vram.probe import MemoryProbe
from loraforge.vram.settings import memory_settings
from loraforge.vram.traced import trace_step

from .conftest import train_quietly

# Every batch has the same size (no buckets), so each step's peak is the same.
_FIXED_SIZE = {"resolution": 128, "enable_bucket": False}

CASES = {
    "sd1-lora-adamw-te-live-vae-b1": (
        "sd1",
        {"training": {"batch_size": 1}},
    ),
    "sd1-locon-adafactor-checkpointing-unet-only-cached-b4": (
        "sd1",
        {
            "network": {"algorithm": "locon", "conv_dim": 4, "train_text_encoder": False},
            "training": {
                "batch_size": 4,
                "optimizer": "Adafactor",
                "gradient_checkpointing": True,
            },
            "cache": {"latents": "memory"},
        },
    ),
    "sd1-loha-prodigy-te-cached-b1": (
        "sd1",
        {
            "network": {"backend": "lycoris", "algorithm": "loha", "dim": 4, "alpha": 2},
            "training": {"batch_size": 1, "optimizer": "Prodigy", "learning_rate": 1.0},
            "cache": {"latents": "memory"},
        },
    ),
    "sd1-lora-lion-checkpointing-te-accumulation-b4": (
        "sd1",
        {
            "training": {
                "batch_size": 4,
                "optimizer": "Lion",
                "learning_rate": 1e-4,
                "gradient_checkpointing": True,
                "gradient_accumulation_steps": 2,
                "max_grad_norm": 1.0,
            },
        },
    ),
    "sdxl-lora-adamw-te-cached-b4": (
        "sdxl",
        {"training": {"batch_size": 4}, "cache": {"latents": "memory"}},
    ),
    "sdxl-lora-lion-checkpointing-unet-only-cached-text-live-vae-b1": (
        "sdxl",
        {
            "network": {"train_text_encoder": False},
            "training": {
                "batch_size": 1,
                "optimizer": "Lion",
                "learning_rate": 1e-4,
                "gradient_checkpointing": True,
            },
            "cache": {"text_encoder_outputs": "memory"},
        },
    ),
    "sdxl-locon-adamw-bf16-unet-only-cached-b1": (
        "sdxl",
        {
            "network": {"algorithm": "locon", "conv_dim": 4, "train_text_encoder": False},
            "training": {"batch_size": 1, "mixed_precision": "bf16"},
            "cache": {"latents": "memory", "text_encoder_outputs": "memory"},
        },
    ),
}
_DEFAULT = ("sd1-lora-adamw-te-live-vae-b1", "sdxl-locon-adamw-bf16-unet-only-cached-b1")


def _measure_real_run(recipe_path: Path) -> MemoryProbe:
    run = setup_run(load_recipe(recipe_path))
    probe = MemoryProbe(run, first=2, last=3)
    train_quietly(run, probe)
    assert probe.done
    return probe


@pytest.mark.parametrize(
    "case",
    [c if c in _DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)],
)
def test_traced_estimate_matches_the_measured_steps_of_a_real_run(
    case, make_recipe, tiny_sd1_dir, tiny_sdxl_dir, tmp_path
):
    family, overrides = CASES[case]
    model = tiny_sdxl_dir if family == "sdxl" else tiny_sd1_dir
    overrides = {
        **overrides,
        "dataset": _FIXED_SIZE,
        "training": {**overrides["training"], "max_train_steps": 3},
    }
    recipe_path = make_recipe(tmp_path, overrides, model=model)
    probe = _measure_real_run(recipe_path)

    recipe = load_recipe(recipe_path)
    arch = resolve_architecture(recipe.model.base, recipe.model.family)
    settings = memory_settings(recipe, arch.family)
    traced = trace_step(recipe, arch, settings, cuda_policy=False)  # as the CPU run computes

    measured = probe.tracker.peak
    print(
        "RATIO",
        case,
        traced.peak_bytes / measured,
        analytic_estimate(recipe, arch, settings).tensor_bytes / traced.peak_bytes,
    )
    assert measured > 2 * 2**20  # a meaningful step, not a few kilobytes
    assert traced.peak_bytes == pytest.approx(measured, rel=0.05)
    # the resident parts agree exactly
    real_parts = probe.tracker.live_at_peak()
    for category in ("unet weights", "network weights"):
        assert traced.at_peak.get(category) == real_parts.get(category), category

    # the analytic formulas model a GPU: compare them with the trace as the estimate runs it
    if recipe.training.mixed_precision != "no":
        traced = trace_step(recipe, arch, settings)
    analytic = analytic_estimate(recipe, arch, settings)
    assert analytic.tensor_bytes == pytest.approx(traced.peak_bytes, rel=0.10)
