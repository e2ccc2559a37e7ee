"""Every shipped preset fits the card its header names, by the estimate."""

from __future__ import annotations

import pytest

from loraforge.presets import list_presets
from loraforge.recipe import load_recipe
from loraforge.vram import estimate_vram, parse_size

PRESETS = [p for p in list_presets() if p.vram]


def test_there_are_presets_with_budgets():
    names = {p.name for p in PRESETS}
    assert {"char-8gb", "char-12gb", "sdxl-char-12gb", "sdxl-style-24gb"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_fits_its_budget_analytically(preset):
    budget = parse_size(preset.vram)
    estimate = estimate_vram(load_recipe(preset.path), budget_bytes=budget)
    assert estimate.fits, f"{preset.name}: {estimate.total_bytes / 2**30:.2f} GiB > {preset.vram}"
    assert estimate.family == preset.family
    assert estimate.suggestions == ()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_fits_its_budget_traced_and_methods_agree(preset):
    recipe = load_recipe(preset.path)
    traced = estimate_vram(recipe, method="traced", budget_bytes=parse_size(preset.vram))
    assert traced.fits
    analytic = estimate_vram(recipe)
    assert analytic.tensor_bytes == pytest.approx(traced.tensor_bytes, rel=0.10)
