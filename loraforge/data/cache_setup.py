"""Build the caches a recipe asks for; shared by ``loraforge cache`` and ``train`` so both make
(and find) exactly the same entries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.data.cache import LatentCache, prepare_latent_cache
from loraforge.data.masks import require_masks
from loraforge.data.plan import BucketPlan
from loraforge.data.subsets import ResolvedSubset
from loraforge.data.text_cache import TextCache, fixed_captions, prepare_text_cache
from loraforge.models.flow_prompts import caption_token_length
from loraforge.recipe import Recipe

ProgressFactory = Callable[[str], AbstractContextManager[Callable[[int, int], None]]]


@dataclass(frozen=True)
class Caches:
    latents: LatentCache | None
    text: TextCache | None


def cache_dir(recipe: Recipe) -> Path:
    """The recipe's cache folder: ``cache.dir`` or ``<output.dir>/cache``."""
    return Path(recipe.cache.dir) if recipe.cache.dir else Path(recipe.output.dir) / "cache"


def vae_dtype(recipe: Recipe, family: str, device: torch.device) -> torch.dtype:
    """The VAE's dtype while encoding (the rule: :func:`loraforge.training.dtypes.dtype_plan`)."""
    from loraforge.training.dtypes import torch_dtype, vae_dtype_name

    mixed = recipe.training.mixed_precision
    return torch_dtype(vae_dtype_name(mixed, family, on_cpu=device.type == "cpu"))


def prepare_caches(
    recipe: Recipe,
    model: Any,
    plan: BucketPlan,
    subsets: Sequence[ResolvedSubset],
    *,
    progress: ProgressFactory,
    only_disk: bool = False,
) -> Caches:
    """Build (or reuse) the latent and text-encoder caches ``recipe.cache`` asks for.

    Args:
        recipe: the recipe.
        model: a ``LoadedModel`` whose VAE and text encoders are on their device and dtype.
        plan, subsets: the bucket plan and ``Discovery.subsets``.
        progress: makes a ``(done, total)`` callback for a description
            (see :mod:`loraforge.progress`).
        only_disk: build only the caches set to ``disk`` (what ``loraforge cache`` writes).
    """
    cfg, root = recipe.cache, cache_dir(recipe)
    wanted = ("disk",) if only_disk else ("memory", "disk")
    latents = text = None
    if cfg.latents in wanted:
        flips = {i for i, s in enumerate(subsets) if s.config.flip_aug}
        masks = None
        if recipe.training.masked_loss:  # the entries hold the masks too
            masks = require_masks([planned.record for planned in plan.images], subsets)
        with progress("caching latents") as update:
            latents = prepare_latent_cache(
                plan,
                model.vae,
                mode=cfg.latents,
                cache_dir=root / "latents",
                vae_identity=model.vae_identity,
                flip_subsets=flips,
                batch_size=cfg.vae_batch_size,
                decode_workers=max(1, recipe.dataset.num_workers),
                seed=recipe.training.seed,
                progress=update,
                masks=masks,
            )
    if cfg.text_encoder_outputs in wanted:
        captions = fixed_captions(plan, subsets)
        with progress("caching text-encoder outputs") as update:
            text = prepare_text_cache(
                captions,
                model.text_encoders,
                model.tokenizers,
                model.family,
                mode=cfg.text_encoder_outputs,
                cache_dir=root / "text",
                model_identity=model.model_identity,
                clip_skip=recipe.model.clip_skip,
                max_token_length=caption_token_length(
                    model.family,
                    getattr(model, "variant", None),
                    recipe.model.max_token_length,
                    recipe.model.t5xxl_max_token_length,
                ),
                progress=update,
            )
    return Caches(latents, text)
