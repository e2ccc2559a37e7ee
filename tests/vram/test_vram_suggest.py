"""Over-budget recipes get the cheapest changes that fit, each with a re-estimated saving."""

from __future__ import annotations

import pytest

from loraforge.vram import estimate_vram, parse_size

from .conftest import recipe_from

HEAVY_SDXL = {
    "dataset": {"resolution": 1024, "max_bucket_reso": 2048},
    "training": {"batch_size": 4, "optimizer": "AdamW", "mixed_precision": "bf16"},
}


def _apply(sections: dict, settings: dict) -> dict:
    """Apply ``{"training.batch_size": 2}``-style settings to recipe sections (a fresh dict)."""
    out = {k: dict(v) for k, v in sections.items()}
    for dotted, value in settings.items():
        section, field = dotted.split(".")
        out.setdefault(section, {})[field] = value
    return out


def test_no_suggestions_when_it_fits():
    estimate = estimate_vram(recipe_from({}), budget_bytes=parse_size("24GB"))
    assert estimate.fits is True
    assert estimate.suggestions == ()


def test_no_budget_no_verdict():
    estimate = estimate_vram(recipe_from({}))
    assert estimate.fits is None and estimate.suggestions == ()


def test_over_budget_suggestions_fit_and_their_savings_are_real():
    budget = parse_size("24GB")
    estimate = estimate_vram(recipe_from(HEAVY_SDXL, "sdxl"), budget_bytes=budget)
    assert estimate.fits is False
    assert estimate.suggestions
    fitting = [s for s in estimate.suggestions if s.fits]
    assert fitting, [s.change for s in estimate.suggestions]
    # the ones that fit come first; checkpointing is among them for SDXL at batch 4
    assert estimate.suggestions[: len(fitting)] == tuple(fitting)
    assert any("checkpointing" in s.change for s in fitting)
    for s in estimate.suggestions:
        assert s.saving_bytes > 0
        assert s.total_bytes == estimate.total_bytes - s.saving_bytes
        # re-estimating the recipe with the suggested settings gives the stated total
        changed = recipe_from(_apply(HEAVY_SDXL, s.settings), "sdxl")
        assert estimate_vram(changed).total_bytes == s.total_bytes
        assert (s.total_bytes <= budget) == s.fits


def test_when_nothing_alone_fits_a_combination_is_offered():
    budget = parse_size("9GB")
    estimate = estimate_vram(recipe_from(HEAVY_SDXL, "sdxl"), budget_bytes=budget)
    first = estimate.suggestions[0]
    assert " + " in first.change
    changed = recipe_from(_apply(HEAVY_SDXL, first.settings), "sdxl")
    assert estimate_vram(changed).total_bytes == first.total_bytes
    assert first.fits == (first.total_bytes <= budget)


@pytest.mark.parametrize(
    ("sections", "absent"),
    [
        ({"dataset": {"subsets": [{"dir": "images", "color_aug": True}]}}, "cache the latents"),
        ({"training": {"gradient_checkpointing": True}}, "gradient checkpointing"),
        ({"training": {"optimizer": "AdamW8bit"}}, "8-bit"),
        ({"training": {"batch_size": 1}}, "halve the batch"),
    ],
)
def test_changes_that_do_not_apply_are_not_suggested(sections, absent):
    base = {"cache": {"latents": "none"}, "training": {"batch_size": 2}}
    merged = _apply(base, {f"{k}.{f}": v for k, d in sections.items() for f, v in d.items()})
    estimate = estimate_vram(recipe_from(merged), budget_bytes=parse_size("1GB"))
    assert all(absent not in s.change for s in estimate.suggestions if " + " not in s.change)
