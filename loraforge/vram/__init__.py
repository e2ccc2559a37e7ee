"""VRAM estimation: will a recipe fit the card, and what to change if it does not.

Two methods, neither needs a GPU or downloaded weights (architectures come from the configs
shipped in ``loraforge/models/configs``):

* ``analytic`` (default): parameter counts from the configs and per-operation activation rules;
  instant, imports no torch.
* ``traced``: builds the full-size architecture on fake tensors and runs one real training step
  with the recipe's network, precision, checkpointing and optimizer, measuring the peak of live
  tensor bytes; seconds for SD 1.5, well under a minute for SDXL, on a CPU.

Example::

    from loraforge.recipe import load_recipe
    from loraforge.vram import estimate_vram, parse_size, render_vram

    estimate = estimate_vram(load_recipe("recipe.yaml"), budget_bytes=parse_size("12GB"))
    console.print(render_vram(estimate))
    if not estimate.fits: ...
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loraforge.errors import RecipeError
from loraforge.recipe.types import Recipe
from loraforge.vram.analytic import analytic_estimate
from loraforge.vram.arch import Architecture, resolve_architecture
from loraforge.vram.report import render_vram, vram_to_dict
from loraforge.vram.result import Method, Suggestion, VramEstimate, VramRow
from loraforge.vram.settings import MemorySettings, memory_settings
from loraforge.vram.sizes import format_bytes, header_budget, parse_size
from loraforge.vram.suggest import suggest

__all__ = [
    "METHODS",
    "Architecture",
    "MemorySettings",
    "Suggestion",
    "VramEstimate",
    "VramRow",
    "estimate_vram",
    "format_bytes",
    "header_budget",
    "parse_size",
    "render_vram",
    "resolve_architecture",
    "vram_to_dict",
]

METHODS: tuple[str, ...] = ("analytic", "traced")


def estimate_vram(
    recipe: Recipe,
    *,
    method: Method = "analytic",
    budget_bytes: int | None = None,
    architecture_dir: str | Path | None = None,
) -> VramEstimate:
    """Estimate the peak GPU memory of one training step of ``recipe``.

    Args:
        recipe: the loaded recipe.
        method: ``analytic`` (instant, no torch) or ``traced`` (fake-tensor training step).
        budget_bytes: the card's memory; sets ``fits`` and, when over, ``suggestions``
            (see :func:`parse_size` for ``"12GB"``).
        architecture_dir: a diffusers config folder to use instead of the recipe's model
            (default: the local model's own configs, else the family's published ones).

    Raises:
        RecipeError: an unknown method, or ``model.family: auto`` with a hub model.
        ModelError: unreadable model configs, or a family mismatch.
        DependencyError: (traced) the network backend's package is missing.
    """
    if method not in METHODS:
        raise RecipeError(
            f"unknown VRAM estimation method {method!r}",
            hint=f"use one of: {', '.join(METHODS)}",
        )
    model = recipe.model
    config_dir = Path(architecture_dir) if architecture_dir is not None else None
    arch = resolve_architecture(model.base, model.family, vae=model.vae, config_dir=config_dir)
    estimate = _estimate(recipe, arch, method)
    if budget_bytes is None:
        return estimate

    def analytic_total(changed: Recipe) -> int:
        return _estimate(changed, arch, "analytic").total_bytes

    suggestions = suggest(recipe, estimate, budget_bytes, analytic_total)
    notes = estimate.notes
    if suggestions and method == "traced":
        notes += ("suggested savings are the analytic method's differences",)
    return replace(estimate, budget_bytes=budget_bytes, suggestions=suggestions, notes=notes)


def _estimate(recipe: Recipe, arch: Architecture, method: str) -> VramEstimate:
    settings = memory_settings(recipe, arch.family)
    if arch.family in ("sd3", "flux") and method != "traced":
        from loraforge.vram.flow_estimate import flow_analytic_estimate

        return flow_analytic_estimate(recipe, arch, settings)
    if method == "traced":
        from loraforge.vram.traced import traced_estimate

        return traced_estimate(recipe, arch, settings)
    return analytic_estimate(recipe, arch, settings)
