"""The bucket plan: every discovered image with its bucket, and the buckets with their counts.

This is what ``loraforge bucket`` reports and what the training sampler draws from. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraforge.data.buckets import BucketAssignment, Bucketer, BucketSettings, Size
from loraforge.data.discovery import Discovery, FileIssue, ImageRecord
from loraforge.errors import DatasetError


@dataclass(frozen=True)
class PlannedImage:
    """An image and its bucket assignment."""

    record: ImageRecord
    assignment: BucketAssignment


@dataclass(frozen=True)
class Bucket:
    """One bucket.

    Attributes:
        resolution: ``(width, height)``.
        images: indices into :attr:`BucketPlan.images`.
        samples: images x repeats (one epoch's samples in this bucket).
        mean_aspect_error: mean absolute aspect-ratio error of its images (without repeats).
    """

    resolution: Size
    images: tuple[int, ...]
    samples: int
    mean_aspect_error: float

    def batches(self, batch_size: int) -> int:
        """Batches per epoch (the last one may be partial; buckets are never mixed)."""
        return math.ceil(self.samples / batch_size)


@dataclass(frozen=True)
class BucketPlan:
    """Images assigned to buckets.

    Attributes:
        settings: the (adjusted) bucket settings used.
        images: planned images in discovery order.
        buckets: non-empty buckets sorted by resolution.
        skipped: images that cannot be bucketed (too small for ``bucket_no_upscale``).
        mean_aspect_error: mean absolute aspect-ratio error over all images (sd-scripts'
            ``mean_img_ar_error``, without repeats).
        validation: the held-out images (``Discovery.validation``) with their buckets; they
            are in no bucket's samples.
    """

    settings: BucketSettings
    images: tuple[PlannedImage, ...]
    buckets: tuple[Bucket, ...]
    skipped: tuple[FileIssue, ...]
    mean_aspect_error: float
    validation: tuple[PlannedImage, ...] = ()

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images x repeats, reg included)."""
        return sum(bucket.samples for bucket in self.buckets)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch on one process: buckets are batched separately."""
        return sum(bucket.batches(batch_size) for bucket in self.buckets)

    def steps_per_epoch(self, batch_size: int, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps per epoch (as sd-scripts: ``ceil(batches / accumulation)``)."""
        return math.ceil(self.batches_per_epoch(batch_size) / gradient_accumulation_steps)

    def bucket_samples(self) -> list[list[int]]:
        """Per bucket, image indices with each image repeated ``repeats`` times (in order)."""
        return [
            [i for i in bucket.images for _ in range(self.images[i].record.repeats)]
            for bucket in self.buckets
        ]


def plan_buckets(discovery: Discovery, settings: BucketSettings) -> BucketPlan:
    """Assign every discovered image to its bucket.

    Args:
        discovery: the discovered images.
        settings: the dataset's bucket settings.

    Returns:
        The plan. Images whose bucket would have a zero side (``bucket_no_upscale`` with an image
        side below ``bucket_reso_steps``) are moved to ``skipped``.

    Raises:
        DatasetError: invalid bucket settings, or no image can be bucketed.
    """
    bucketer = Bucketer(settings)
    skipped: list[FileIssue] = []
    planned = _assign(bucketer, discovery.images, skipped)
    validation = _assign(bucketer, discovery.validation, skipped)
    if not any(not p.record.is_reg for p in planned):
        raise DatasetError(
            "no training image can be bucketed (all are smaller than one bucket step)",
            hint="turn off bucket_no_upscale or lower bucket_reso_steps",
        )
    return BucketPlan(
        settings=bucketer.settings,
        images=tuple(planned),
        buckets=_group(planned),
        skipped=tuple(skipped),
        mean_aspect_error=_mean([abs(p.assignment.aspect_error) for p in planned]),
        validation=tuple(validation),
    )


def _assign(
    bucketer: Bucketer, records: tuple[ImageRecord, ...], skipped: list[FileIssue]
) -> list[PlannedImage]:
    """Bucket ``records``; those too small for ``bucket_no_upscale`` go to ``skipped``."""
    planned: list[PlannedImage] = []
    for record in records:
        assignment = bucketer.assign(*record.size)
        if min(assignment.bucket) < 1:
            step = bucketer.settings.bucket_reso_steps
            skipped.append(
                FileIssue(
                    record.path,
                    f"too small for bucket_no_upscale: {record.size[0]}x{record.size[1]} has a "
                    f"side under bucket_reso_steps ({step} px)",
                )
            )
            continue
        planned.append(PlannedImage(record, assignment))
    return planned


def _group(planned: list[PlannedImage]) -> tuple[Bucket, ...]:
    members: dict[Size, list[int]] = {}
    for index, image in enumerate(planned):
        members.setdefault(image.assignment.bucket, []).append(index)
    return tuple(
        Bucket(
            resolution=resolution,
            images=tuple(indices),
            samples=sum(planned[i].record.repeats for i in indices),
            mean_aspect_error=_mean([abs(planned[i].assignment.aspect_error) for i in indices]),
        )
        for resolution, indices in sorted(members.items())
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
