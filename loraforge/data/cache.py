"""VAE latents cached in memory or on disk, and the one function that encodes pixels.

Every bucketed image is encoded at its bucket resolution with its deterministic (centre) crop, and
again mirrored when its subset flips images. ``train`` asks :class:`LatentCache` for a batch by
image key and flip flag; the live path (no cache) calls :func:`encode_pixels` on the same pixels,
so both paths feed the UNet identical quantities. Text-encoder outputs live in
:mod:`loraforge.data.text_cache` and are re-exported here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from loraforge.data.cache_store import EntryStore
from loraforge.data.dataset import masks_to_size, to_tensor
from loraforge.data.images import load_image_and_alpha
from loraforge.data.masks import MaskSource, load_mask, sample_mask
from loraforge.data.plan import BucketPlan, PlannedImage
from loraforge.data.text_cache import TextCache, prepare_text_cache
from loraforge.data.transforms import flip_horizontal, resize_and_crop

__all__ = [
    "CacheStats",
    "LatentCache",
    "TextCache",
    "encode_pixels",
    "prepare_latent_cache",
    "prepare_text_cache",
]

Mode = Literal["memory", "disk"]
Progress = Callable[[int, int], None]  # (done, total)


def encode_pixels(
    vae: Any,
    pixels: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """VAE-encode ``(B, 3, H, W)`` pixels in ``[-1, 1]``; ``generator`` may be one per image.

    Returns ``(B, C, H/8, W/8)`` latents sampled from the posterior and multiplied by the VAE's
    scaling factor (sd-scripts' convention); the 16-channel SD3 / FLUX VAEs first subtract their
    shift factor: ``(latents - shift_factor) * scaling_factor``.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass
class CacheStats:
    """What preparing a cache did: entries encoded now, reused from disk, and rebuilt as stale."""

    encoded: int = 0
    reused: int = 0
    stale: int = 0
    seconds: float = 0.0


@dataclass
class LatentCache:
    """Latents by image key; flipped versions under ``key`` + :data:`FLIP_SUFFIX`. With masked
    loss every entry also holds its loss mask at latent size (``(1, H/8, W/8)``), cut and
    flipped like the latents' pixels."""

    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    store: EntryStore | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    mask_memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, key: str, flipped: bool = False, tensor: str = "latents") -> torch.Tensor:
        name = key + FLIP_SUFFIX if flipped else key
        memory = self.memory if tensor == "latents" else self.mask_memory
        if name in memory:
            return memory[name]
        if self.store is None:
            raise KeyError(f"no cached {tensor} for {name}")
        entry = self.store.load(name)
        if tensor not in entry:
            raise KeyError(f"the cache entry of {name} has no {tensor}")
        return entry[tensor]

    def batch(self, keys: Sequence[str], flipped: Sequence[bool]) -> torch.Tensor:
        """Stack the cached latents of one batch (all images of a batch share a bucket)."""
        return torch.stack([self.get(k, f) for k, f in zip(keys, flipped, strict=True)])

    def masks(self, keys: Sequence[str], flipped: Sequence[bool]) -> torch.Tensor:
        """Stack the cached loss masks of one batch: ``(B, 1, H/8, W/8)``."""
        pairs = zip(keys, flipped, strict=True)
        return torch.stack([self.get(k, f, tensor="mask") for k, f in pairs])


FLIP_SUFFIX = "#flipped"


@dataclass(frozen=True)
class _Job:
    name: str
    planned: PlannedImage
    flipped: bool
    depends: dict[str, str]
    mask: MaskSource | None = None


def _image_identity(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _jobs(
    plan: BucketPlan,
    flip_subsets: set[int],
    vae_identity: str,
    dtype: torch.dtype,
    masks: Mapping[str, MaskSource] | None,
) -> list[_Job]:
    jobs = []
    held_out = {id(p) for p in plan.validation}
    for planned in (*plan.images, *plan.validation):
        record, assignment = planned.record, planned.assignment
        mask = masks.get(record.key) if masks is not None else None
        depends = {
            "vae": vae_identity,
            "image": _image_identity(record.path),
            "bucket": "x".join(map(str, assignment.bucket)),
            "resized": "x".join(map(str, assignment.resized)),
            "crop": "x".join(map(str, assignment.center_crop())),
            "dtype": str(dtype).removeprefix("torch."),
            "noise": "per-key",  # each entry's posterior sample is seeded by its own key
            **({"mask": mask.identity()} if mask is not None else {}),
        }
        flips = record.subset in flip_subsets and id(planned) not in held_out
        for flipped in (False, True) if flips else (False,):
            name = record.key + FLIP_SUFFIX if flipped else record.key
            jobs.append(_Job(name, planned, flipped, {**depends, "flipped": str(flipped)}, mask))
    return jobs


def centre_pixels(planned: PlannedImage, flipped: bool = False) -> torch.Tensor:
    """An image at its bucket with the centre crop (optionally mirrored): ``(3, H, W)`` float32
    in ``[-1, 1]``, what the cache encodes and the validation loss sees."""
    rgb, _ = load_image_and_alpha(planned.record.path, alpha=False)
    return _centred(rgb, planned.assignment, flipped)


def _centred(rgb: Any, assignment: Any, flipped: bool) -> torch.Tensor:
    pixels = np.array(resize_and_crop(rgb, assignment, assignment.center_crop()), dtype=np.uint8)
    return to_tensor(flip_horizontal(pixels) if flipped else pixels)


def _sample(job: _Job) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The entry's pixels ``(3, H, W)`` and, with a mask source, its mask ``(1, H, W)``."""
    record, assignment = job.planned.record, job.planned.assignment
    wants_alpha = job.mask is not None and job.mask.kind == "alpha"
    rgb, alpha = load_image_and_alpha(record.path, alpha=wants_alpha)
    mask = None
    if job.mask is not None:
        loaded = load_mask(job.mask, record.size, alpha)
        origin = assignment.center_crop()
        mask = torch.from_numpy(sample_mask(loaded, assignment, origin, job.flipped))[None]
    return _centred(rgb, assignment, job.flipped), mask


def _decode_batch(jobs: list[_Job]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    samples = [_sample(job) for job in jobs]
    return torch.stack([pixels for pixels, _ in samples]), [mask for _, mask in samples]


def _batches(jobs: list[_Job], batch_size: int) -> Iterator[list[_Job]]:
    """Jobs grouped so that every batch holds one bucket size (tensors must stack)."""
    by_bucket: dict[tuple[int, int], list[_Job]] = {}
    for job in jobs:
        by_bucket.setdefault(job.planned.assignment.bucket, []).append(job)
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def prepare_latent_cache(
    plan: BucketPlan,
    vae: Any,
    *,
    mode: Mode,
    cache_dir: Path | None,
    vae_identity: str,
    flip_subsets: set[int],
    batch_size: int = 4,
    decode_workers: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
    masks: Mapping[str, MaskSource] | None = None,
) -> LatentCache:
    """Encode every planned image (and its mirror for subsets in ``flip_subsets``) once, and
    every held-out validation image (never mirrored).

    Args:
        plan: the bucket plan (images with their buckets).
        vae: the VAE (its device and dtype are used as they are).
        mode: ``memory`` keeps latents in RAM; ``disk`` writes one file per image under
            ``cache_dir`` and reuses valid files on the next run.
        cache_dir: the latents folder (required for ``disk``).
        vae_identity: changes when the VAE's weights change (``LoadedModel.vae_identity``).
        flip_subsets: indices of subsets with ``flip_aug``.
        batch_size: images per VAE call (``cache.vae_batch_size``).
        decode_workers: threads decoding images while the VAE encodes.
        seed: with each entry's key, seeds its posterior sample (see :func:`entry_generator`),
            so a cache is the same however it was built.
        progress: called with ``(done, total)`` after every batch.
        masks: mask source by image key (masked loss): every entry also stores its loss mask
            at latent size, and depends on the mask's source.
    """
    started = time.perf_counter()
    store = EntryStore(cache_dir) if mode == "disk" else None
    if mode == "disk" and cache_dir is None:
        raise ValueError("a disk cache needs cache_dir")
    cache = LatentCache(store=store)
    jobs = _jobs(plan, flip_subsets, vae_identity, vae.dtype, masks)
    todo = []
    for job in jobs:
        if store is not None and store.is_valid(job.name, job.depends):
            cache.stats.reused += 1
        else:
            cache.stats.stale += int(store is not None and store.path_for(job.name).exists())
            todo.append(job)
    done = cache.stats.reused
    if progress:
        progress(done, len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        batches = list(_batches(todo, batch_size))
        pending = pool.map(_decode_batch, batches[:1])
        for index, batch in enumerate(batches):
            pixels, masks_of_batch = next(iter(pending))
            # Decode the next batch while the VAE works on this one.
            pending = pool.map(_decode_batch, batches[index + 1 : index + 2])
            generators = [entry_generator(vae, seed, job.name) for job in batch]
            latents = encode_pixels(vae, pixels, generators).to("cpu")
            for job, latent, mask in zip(batch, latents, masks_of_batch, strict=True):
                entry = {"latents": latent}
                if mask is not None:
                    entry["mask"] = masks_to_size(mask[None], tuple(latent.shape[-2:]))[0]
                if store is not None:
                    store.save(job.name, entry, job.depends)
                else:
                    cache.memory[job.name] = latent
                    if mask is not None:
                        cache.mask_memory[job.name] = entry["mask"]
            cache.stats.encoded += len(batch)
            done += len(batch)
            if progress:
                progress(done, len(jobs))
    cache.stats.seconds = time.perf_counter() - started
    return cache


def entry_generator(vae: Any, seed: int, key: str) -> torch.Generator:
    """The generator of one cache entry, seeded from the run seed and the entry's own key, so
    an entry's latents never depend on which other images were encoded with it."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator(device=torch.device(vae.device)).manual_seed(
        int.from_bytes(digest[:8], "little") & (2**63 - 1)
    )
