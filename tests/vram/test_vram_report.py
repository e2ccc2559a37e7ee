"""The rendered table says what the numbers are and whether the recipe fits."""

from __future__ import annotations

from rich.console import Console

from loraforge.vram import estimate_vram, format_bytes, parse_size, render_vram

from .conftest import recipe_from


def _text(renderable) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_breakdown_lists_every_component_and_the_total():
    estimate = estimate_vram(recipe_from({"cache": {"latents": "none"}}))
    text = _text(render_vram(estimate))
    for component in (
        "UNet weights (fp16)",
        "text encoder 1 weights",
        "VAE weights",
        "network weights",
        "optimizer state (AdamW)",
        "UNet activations",
        "CUDA context",
        "allocator reserve",
    ):
        assert component in text
    assert format_bytes(estimate.total_bytes) in text
    assert "estimated peak" in text


def test_verdict_and_suggestions_when_over_budget():
    estimate = estimate_vram(
        recipe_from({"training": {"batch_size": 8}}), budget_bytes=parse_size("8GB")
    )
    text = _text(render_vram(estimate))
    assert "does not fit" in text
    assert "cheapest first" in text
    assert "gradient_checkpointing: true" in text


def test_fits_verdict():
    text = _text(render_vram(estimate_vram(recipe_from({}), budget_bytes=parse_size("24GB"))))
    assert "fits" in text and "spare" in text
