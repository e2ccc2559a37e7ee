"""The torch side of the dataset: samples (decoded, resized, cropped, augmented) and batches.

The only module in :mod:`loraforge.data` that imports torch. A batch is a dict:

``images``            float32 ``(B, 3, H, W)`` in ``[-1, 1]`` (absent with ``with_images=False``)
``captions``          list of processed captions
``original_sizes_hw`` int64 ``(B, 2)``: the displayed image size before resizing (SDXL)
``crop_top_lefts``    int64 ``(B, 2)``: crop ``(top, left)`` in the resized image (SDXL)
``target_sizes_hw``   int64 ``(B, 2)``: the bucket size ``(H, W)`` (SDXL)
``loss_weights``      float32 ``(B,)``: 1 for training images, ``prior_loss_weight`` for reg
``flipped``           list of bools
``keys``              list of image keys (absolute paths, the cache lookup key)
``is_reg``            list of bools
``masks``             float32 ``(B, 1, H, W)`` loss weights in ``[0, 1]``, cut like the images
                      (only with masks and images; see :mod:`loraforge.data.masks`)

SDXL's crop conditioning here is the real crop offset in the resized image (as in the SDXL paper
and diffusers' SDXL scripts); sd-scripts passes a centred "fit" offset instead.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loraforge.data.buckets import BucketSettings, crop_origin
from loraforge.data.captions import CaptionOptions, process_caption
from loraforge.data.discovery import Discovery, discover
from loraforge.data.images import load_image_and_alpha
from loraforge.data.masks import MaskSource, load_mask, require_masks, sample_mask
from loraforge.data.plan import BucketPlan, plan_buckets
from loraforge.data.sampler import BucketBatchSampler, SampleRef
from loraforge.data.subsets import ResolvedSubset
from loraforge.data.transforms import (
    color_augment,
    flip_horizontal,
    flipped_crop_origin,
    resize_and_crop,
)
from loraforge.recipe.types import DatasetConfig

_CAPTION_STREAM = 0x5DEECE66D


@dataclass(frozen=True)
class _SubsetOptions:
    captions: CaptionOptions
    flip_aug: bool
    color_aug: bool
    random_crop: bool


class BucketDataset(Dataset):
    """One item per planned image; index it with a :class:`SampleRef` (or a plain int).

    Args:
        plan: the bucket plan (images and their buckets).
        subsets: the resolved subsets the plan's images refer to (``Discovery.subsets``).
        prior_loss_weight: loss weight of regularization images (default 1.0).
        with_images: decode images (default True); False gives captions and sizes only, for
            training from cached latents.
        masks: mask source by image key (masked loss; with images, each item gets its mask),
            or ``None``.
    """

    def __init__(
        self,
        plan: BucketPlan,
        subsets: Sequence[ResolvedSubset],
        prior_loss_weight: float = 1.0,
        with_images: bool = True,
        masks: Mapping[str, MaskSource] | None = None,
    ) -> None:
        self.plan = plan
        self.prior_loss_weight = prior_loss_weight
        self.with_images = with_images
        self.masks = masks
        self._options = [
            _SubsetOptions(
                CaptionOptions.from_subset(s.config),
                s.config.flip_aug,
                s.config.color_aug,
                s.config.random_crop,
            )
            for s in subsets
        ]

    def __len__(self) -> int:
        return len(self.plan.images)

    def __getitem__(self, ref: SampleRef | int) -> dict[str, Any]:
        if not isinstance(ref, SampleRef):
            ref = SampleRef(int(ref), 0, int(ref))
        planned = self.plan.images[ref.index]
        record, assignment = planned.record, planned.assignment
        options = self._options[record.subset]
        # Pixels and caption draw from separate generators, both seeded by the sample, so a
        # caption comes out the same whether or not images are decoded (cached latents).
        rng = random.Random(ref.seed)
        caption_rng = random.Random(ref.seed ^ _CAPTION_STREAM)
        flipped = options.flip_aug and rng.random() < 0.5
        origin = crop_origin(assignment, options.random_crop, rng)
        item: dict[str, Any] = {}
        if self.with_images:
            source = self.masks.get(record.key) if self.masks is not None else None
            wants_alpha = source is not None and source.kind == "alpha"
            rgb, alpha = load_image_and_alpha(record.path, alpha=wants_alpha)
            if source is not None:
                mask = load_mask(source, record.size, alpha)
                item["mask"] = torch.from_numpy(sample_mask(mask, assignment, origin, flipped))
            item["image"] = self._pixels(rgb, assignment, origin, options, flipped, rng)
        if flipped:
            origin = flipped_crop_origin(origin, assignment)
        bucket_w, bucket_h = assignment.bucket
        item.update(
            caption=process_caption(record.caption, options.captions, caption_rng, ref.epoch + 1),
            original_size_hw=(record.size[1], record.size[0]),
            crop_top_left=(origin[1], origin[0]),
            target_size_hw=(bucket_h, bucket_w),
            loss_weight=self.prior_loss_weight if record.is_reg else 1.0,
            flipped=flipped,
            key=record.key,
            is_reg=record.is_reg,
        )
        return item

    def _pixels(self, rgb, assignment, origin, options, flipped, rng) -> torch.Tensor:
        image = resize_and_crop(rgb, assignment, origin)
        pixels = np.array(image, dtype=np.uint8)  # a writable copy, as torch wants
        if options.color_aug:
            pixels = color_augment(pixels, rng)
        if flipped:
            pixels = flip_horizontal(pixels)
        return to_tensor(pixels)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> float32 ``(3, H, W)`` in ``[-1, 1]`` (x / 127.5 - 1)."""
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def collate_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch (all from one bucket, so images stack)."""
    batch: dict[str, Any] = {
        "captions": [item["caption"] for item in items],
        "original_sizes_hw": torch.tensor([item["original_size_hw"] for item in items]),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items]),
        "target_sizes_hw": torch.tensor([item["target_size_hw"] for item in items]),
        "loss_weights": torch.tensor([item["loss_weight"] for item in items], dtype=torch.float32),
        "flipped": [item["flipped"] for item in items],
        "keys": [item["key"] for item in items],
        "is_reg": [item["is_reg"] for item in items],
    }
    if items and "image" in items[0]:
        batch["images"] = torch.stack([item["image"] for item in items])
    if items and "mask" in items[0]:
        batch["masks"] = torch.stack([item["mask"] for item in items]).unsqueeze(1)
    return batch


def masks_to_size(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average ``(B, 1, H, W)`` masks down to ``size`` ``(h, w)`` (latent pixels): each latent
    pixel's weight is the mean over the image pixels it covers (sd-scripts' ``area``
    interpolation in ``apply_masked_loss``); masks already at ``size`` come back unchanged."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return torch.nn.functional.interpolate(masks, size=size, mode="area")


@dataclass(frozen=True)
class TrainingData:
    """Everything the training loop needs from the dataset (see :func:`build_training_data`)."""

    discovery: Discovery
    plan: BucketPlan
    dataset: BucketDataset
    sampler: BucketBatchSampler
    loader: DataLoader


def build_training_data(
    config: DatasetConfig,
    *,
    batch_size: int,
    seed: int,
    prior_loss_weight: float = 1.0,
    num_workers: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    with_images: bool = True,
    discovery: Discovery | None = None,
    masks: bool = False,
) -> TrainingData:
    """Discover, bucket and wrap a dataset in a DataLoader.

    Call ``data.sampler.set_epoch(epoch)`` (0-based) before each epoch and
    ``data.sampler.skip_batches(n)`` to resume in the middle of one.

    Args:
        config: the recipe's dataset section.
        batch_size: per-process batch size.
        seed: the run seed (sample order and augmentation derive from it and the epoch).
        prior_loss_weight: loss weight of regularization images.
        num_workers: decoding processes (default ``config.num_workers``; 0 = in this process).
        num_replicas: data-parallel processes; rank: this one.
        with_images: decode images (False when training from cached latents).
        discovery: a discovery already made (default: discover now).
        masks: load every image's loss mask (masked loss).

    Raises:
        DatasetError: see :func:`~loraforge.data.discovery.discover` and
            :func:`~loraforge.data.plan.plan_buckets`; with ``masks``, a subset or image
            without a usable mask (:func:`~loraforge.data.masks.require_masks`).
    """
    discovery = discovery if discovery is not None else discover(config)
    plan = plan_buckets(discovery, BucketSettings.from_dataset(config))
    sources = require_masks(discovery.images, discovery.subsets) if masks else None
    dataset = BucketDataset(plan, discovery.subsets, prior_loss_weight, with_images, sources)
    sampler = BucketBatchSampler(
        plan.bucket_samples(), batch_size, seed=seed, num_replicas=num_replicas, rank=rank
    )
    workers = config.num_workers if num_workers is None else num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return TrainingData(discovery, plan, dataset, sampler, loader)
