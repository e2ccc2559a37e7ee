"""Cached latents carry their loss masks (masked loss): cut and flipped like the latents' pixels,
averaged to latent size, and rebuilt when the mask changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.data.buckets import BucketSettings
from loraforge.data.cache import prepare_latent_cache
from loraforge.data.dataset import BucketDataset, masks_to_size
from loraforge.data.discovery import discover
from loraforge.data.masks import require_masks
from loraforge.data.plan import plan_buckets
from loraforge.data.sampler import SampleRef
from loraforge.models.loading import load_model
from loraforge.recipe import parse_recipe_text


@pytest.fixture
def project(tmp_path: Path) -> Path:
    images, masks = tmp_path / "data" / "2_lfcat cat", tmp_path / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(128, 128), (160, 96)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
        mask = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)
        mask[:, : size[0] // 4] = 0  # the left quarter is never learned: flips show
        Image.fromarray(mask).save(masks / f"{i}.png")
    return tmp_path


def _plan(project: Path):
    recipe = parse_recipe_text(
        "model: {base: m.safetensors}\n"
        "dataset: {resolution: 128, min_bucket_reso: 64, max_bucket_reso: 256, subsets: "
        "[{dir: data, flip_aug: true, conditioning_data_dir: masks}]}\n"
        "cache: {latents: disk}\n"
        "training: {masked_loss: true}\n",
        base_dir=project,
    )
    found = discover(recipe.dataset)
    return found, plan_buckets(found, BucketSettings.from_dataset(recipe.dataset))


def _cache(plan, model, folder, masks, mode="disk"):
    return prepare_latent_cache(
        plan,
        model.vae,
        mode=mode,
        cache_dir=folder,
        vae_identity="v1",
        flip_subsets={0},
        batch_size=2,
        masks=masks,
    )


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_cached_masks_are_the_live_masks_at_latent_size(
    project: Path, tiny_sd1_dir: Path, mode: str
) -> None:
    found, plan = _plan(project)
    sources = require_masks(found.images, found.subsets)
    cache = _cache(plan, load_model(str(tiny_sd1_dir)), project / "cache", sources, mode)
    live = BucketDataset(plan, found.subsets, masks=sources)  # centre crop, like the cache
    for index, planned in enumerate(plan.images):
        key = planned.record.key
        for flipped in (False, True):
            latents = cache.get(key, flipped)
            seed = next(s for s in range(64) if live[SampleRef(index, 0, s)]["flipped"] == flipped)
            pixel_mask = live[SampleRef(index, 0, seed)]["mask"][None, None]
            expected = masks_to_size(pixel_mask, tuple(latents.shape[-2:]))[0]
            assert torch.equal(cache.get(key, flipped, tensor="mask"), expected)
        unflipped = cache.get(key, False, tensor="mask")
        mirrored = torch.flip(unflipped, [-1])  # the same sums, added in another order
        assert torch.allclose(cache.get(key, True, tensor="mask"), mirrored, atol=1e-6)
        assert float(unflipped[..., :1].max()) == 0.0  # the masked-out left edge stays left
    keys = [plan.images[0].record.key] * 2
    assert cache.masks(keys, [False, True]).shape == (2, 1, 16, 16)


def test_a_changed_mask_or_turning_masks_off_rebuilds_the_entries(
    project: Path, tiny_sd1_dir: Path
) -> None:
    found, plan = _plan(project)
    sources = require_masks(found.images, found.subsets)
    model = load_model(str(tiny_sd1_dir))
    folder = project / "cache"
    total = 2 * len(plan.images)
    assert _cache(plan, model, folder, sources).stats.encoded == total
    assert _cache(plan, model, folder, sources).stats.reused == total
    mask = project / "masks" / "0.png"
    Image.new("L", Image.open(mask).size, 255).save(mask)
    os.utime(mask, ns=(1, 2 * 10**18))
    changed = _cache(plan, model, folder, sources)
    assert (changed.stats.stale, changed.stats.reused) == (2, total - 2)  # 0.png and mirror
    assert _cache(plan, model, folder, None).stats.stale == total
