"""Suggestions for an over-budget recipe: the cheapest changes that bring it under.

Each candidate change is applied to the recipe and the recipe re-estimated analytically (instant;
for a traced estimate the analytic difference is applied to the traced total). Changes are
ordered by what they cost the user, cheapest first; those that fit alone come first, then, when
none does, the cheapest combination that fits (changes added in cost order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from loraforge.recipe.types import Recipe
from loraforge.vram.result import Suggestion, VramEstimate


@dataclass(frozen=True)
class _Candidate:
    change: str
    cost: str
    apply: Callable[[Recipe], Recipe | None]  # None: not applicable to this recipe
    settings: Callable[[Recipe], dict[str, Any]]


def _section(recipe: Recipe, name: str, **changes: Any) -> Recipe:
    return replace(recipe, **{name: replace(getattr(recipe, name), **changes)})


def _cache_latents(r: Recipe) -> Recipe | None:
    blocked = any(s.color_aug or s.random_crop for s in r.dataset.subsets)
    return None if r.cache.latents != "none" or blocked else _section(r, "cache", latents="disk")


def _cache_text(r: Recipe) -> Recipe | None:
    varying = any(
        s.shuffle_caption
        or s.enable_wildcard
        or s.caption_dropout_rate
        or s.caption_tag_dropout_rate
        or s.caption_dropout_every_n_epochs
        for s in r.dataset.subsets
    )
    if r.cache.text_encoder_outputs != "none" or r.network.train_text_encoder or varying:
        return None
    return _section(r, "cache", text_encoder_outputs="disk")


_EIGHT_BIT = {"AdamW": "AdamW8bit", "Lion": "Lion8bit"}


def _eight_bit(r: Recipe) -> Recipe | None:
    target = _EIGHT_BIT.get(r.training.optimizer)
    return None if target is None else _section(r, "training", optimizer=target)


def _checkpointing(r: Recipe) -> Recipe | None:
    if r.training.gradient_checkpointing:
        return None
    return _section(r, "training", gradient_checkpointing=True)


def _sdpa(r: Recipe) -> Recipe | None:
    return None if r.training.attention != "eager" else _section(r, "training", attention="sdpa")


def _fp8(r: Recipe) -> Recipe | None:
    if r.training.fp8_base or r.training.mixed_precision == "no":
        return None
    return _section(r, "training", fp8_base=True)


_SWAP_STEP = 8


def _swap_blocks(r: Recipe) -> Recipe | None:
    """SD3 / FLUX: swap 8 more transformer blocks to the CPU (with checkpointing, required)."""
    from loraforge.recipe.flow_rules import MAX_BLOCKS_TO_SWAP

    limit = MAX_BLOCKS_TO_SWAP.get(r.model.family)
    t = r.training
    if limit is None or t.blocks_to_swap >= limit:
        return None
    swap = min(limit, t.blocks_to_swap + _SWAP_STEP)
    return _section(r, "training", blocks_to_swap=swap, gradient_checkpointing=True)


def _half_batch(r: Recipe) -> Recipe | None:
    t = r.training
    if t.batch_size < 2:
        return None
    return _section(
        r,
        "training",
        batch_size=t.batch_size // 2,
        gradient_accumulation_steps=t.gradient_accumulation_steps * 2,
    )


def _lower_resolution(r: Recipe) -> Recipe | None:
    d = r.dataset
    step = d.bucket_reso_steps
    width, height = d.resolution
    smaller = (max(step, width - step), max(step, height - step))
    if smaller == (width, height) or min(smaller) < d.min_bucket_reso:
        return None
    return _section(r, "dataset", resolution=smaller)


def _no_text_encoder(r: Recipe) -> Recipe | None:
    if not r.network.train_text_encoder or not r.network.train_unet:
        return None
    return _section(r, "network", train_text_encoder=False)


CANDIDATES: tuple[_Candidate, ...] = (
    _Candidate("switch to SDPA attention", "none", _sdpa, lambda r: {"training.attention": "sdpa"}),
    _Candidate(
        "cache the latents",
        "no color_aug / random_crop",
        _cache_latents,
        lambda r: {"cache.latents": "disk"},
    ),
    _Candidate(
        "cache the text-encoder outputs",
        "captions can no longer vary per step",
        _cache_text,
        lambda r: {"cache.text_encoder_outputs": "disk"},
    ),
    _Candidate(
        "use an 8-bit optimizer",
        "needs bitsandbytes and an NVIDIA GPU",
        _eight_bit,
        lambda r: {"training.optimizer": _EIGHT_BIT.get(r.training.optimizer)},
    ),
    _Candidate(
        "turn on gradient checkpointing",
        "about 20-30% slower steps",
        _checkpointing,
        lambda r: {"training.gradient_checkpointing": True},
    ),
    _Candidate(
        "halve the batch (double gradient accumulation)",
        "slower epochs",
        _half_batch,
        lambda r: {
            "training.batch_size": r.training.batch_size // 2,
            "training.gradient_accumulation_steps": r.training.gradient_accumulation_steps * 2,
        },
    ),
    _Candidate(
        "store the base model in fp8 (fp8_base)",
        "slightly lower quality",
        _fp8,
        lambda r: {"training.fp8_base": True},
    ),
    _Candidate(
        "swap more transformer blocks to the CPU (blocks_to_swap)",
        "slower steps: the swapped weights cross PCIe twice per step",
        _swap_blocks,
        lambda r: {"training.blocks_to_swap": _swap_blocks(r).training.blocks_to_swap},
    ),
    _Candidate(
        "train the UNet only",
        "weaker concept binding for characters",
        _no_text_encoder,
        lambda r: {"network.train_text_encoder": False},
    ),
    _Candidate(
        "lower the resolution one bucket step",
        "less detail",
        _lower_resolution,
        lambda r: {"dataset.resolution": list(_lower_resolution(r).dataset.resolution)},
    ),
)


def suggest(
    recipe: Recipe,
    estimate: VramEstimate,
    budget: int,
    analytic_total: Callable[[Recipe], int],
) -> tuple[Suggestion, ...]:
    """Changes that lower ``estimate`` below ``budget``, cheapest first.

    Args:
        recipe: the recipe estimated.
        estimate: its estimate (either method).
        budget: the budget in bytes.
        analytic_total: re-estimates a changed recipe analytically (total bytes).

    Returns:
        Single changes that fit on their own (in cost order); then, if none does, the cheapest
        cumulative combination that fits (or all of them, when even that does not fit); then the
        remaining single changes by saving.
    """
    if estimate.total_bytes <= budget:
        return ()
    base = analytic_total(recipe)
    singles: list[Suggestion] = []
    for candidate in CANDIDATES:
        changed = candidate.apply(recipe)
        if changed is None:
            continue
        saving = base - analytic_total(changed)
        if saving <= 0:
            continue
        total = estimate.total_bytes - saving
        singles.append(
            Suggestion(
                candidate.change,
                candidate.settings(recipe),
                saving,
                total,
                total <= budget,
                candidate.cost,
            )
        )
    fitting = [s for s in singles if s.fits]
    rest = sorted((s for s in singles if not s.fits), key=lambda s: -s.saving_bytes)
    if fitting:
        return tuple(fitting + rest)
    combined = _combination(recipe, estimate, budget, base, analytic_total)
    return tuple(([combined] if combined else []) + rest)


def _apply_all(recipe: Recipe, chosen: list[_Candidate]) -> tuple[Recipe, dict[str, Any]]:
    """Apply ``chosen`` in order; returns the recipe and the settings changed."""
    settings: dict[str, Any] = {}
    for candidate in chosen:
        changed = candidate.apply(recipe)
        if changed is None:
            continue
        settings.update(candidate.settings(recipe))
        recipe = changed
    return recipe, settings


def _combination(
    recipe: Recipe,
    estimate: VramEstimate,
    budget: int,
    base: int,
    analytic_total: Callable[[Recipe], int],
) -> Suggestion | None:
    """Add changes in cost order until the estimate fits, then drop the ones not needed.

    Returns ``None`` when no change applies.
    """

    def total_of(chosen: list[_Candidate]) -> int:
        return estimate.total_bytes - (base - analytic_total(_apply_all(recipe, chosen)[0]))

    chosen: list[_Candidate] = []
    total = estimate.total_bytes
    for candidate in CANDIDATES:
        if candidate.apply(_apply_all(recipe, chosen)[0]) is None:
            continue
        new_total = total_of([*chosen, candidate])
        if new_total < total:
            chosen, total = [*chosen, candidate], new_total
        if total <= budget:
            break
    if total <= budget:  # a cheap early change may have become unnecessary
        for candidate in list(chosen):
            rest = [c for c in chosen if c is not candidate]
            if rest and total_of(rest) <= budget:
                chosen, total = rest, total_of(rest)
    if not chosen:
        return None
    _, settings = _apply_all(recipe, chosen)
    costs = "; ".join(c.cost for c in chosen if c.cost != "none")
    return Suggestion(
        " + ".join(c.change for c in chosen),
        settings,
        estimate.total_bytes - total,
        total,
        total <= budget,
        costs,
    )
