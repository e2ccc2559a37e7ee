"""Aspect-ratio bucketing, the kohya-ss/sd-scripts algorithm.

Pure arithmetic on sizes; no image is opened here and nothing imports torch.

* **Predefined buckets** (``bucket_no_upscale`` off): every ``(w, h)`` with ``w`` from
  ``min_bucket_reso`` to ``max_bucket_reso`` in ``bucket_reso_steps``, ``h`` the largest multiple
  of the step with ``w * h <= max area`` (capped at ``max_bucket_reso``, kept when
  ``>= min_bucket_reso``), both orientations, plus the square bucket (sd-scripts
  ``model_util.make_bucket_resolutions``). An image goes to the bucket with the smallest
  aspect-ratio error (first in sorted order on ties; an image whose size *is* a bucket keeps it),
  is resized to cover it, and the excess is cropped.
* **No upscale**: an image larger than the max area is shrunk to it (keeping its aspect ratio, one
  side rounded to the step, whichever keeps the aspect ratio closer); the bucket is the (resized)
  image size floored to the step, so images are only ever downscaled and the crop is less than one
  step per side.
* **No bucketing** (``enable_bucket`` off): a single bucket at the recipe resolution; images are
  resized to cover it and cropped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from loraforge.errors import DatasetError
from loraforge.recipe.types import DatasetConfig

Size = tuple[int, int]


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> tuple[Size, ...]:
    """The predefined bucket resolutions, sorted (sd-scripts ``make_bucket_resolutions``).

    Args:
        max_reso: ``(width, height)``; its area is the maximum bucket area.
        min_size: smallest bucket side (default 256).
        max_size: largest bucket side (default 1024).
        divisible: the step every side is a multiple of (default 64).

    Returns:
        Sorted, distinct ``(width, height)`` pairs.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible
    return tuple(sorted(resolutions))


@dataclass(frozen=True)
class BucketSettings:
    """The bucketing options of a recipe's dataset section (see DatasetConfig for meanings)."""

    resolution: Size
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_dataset(cls, dataset: DatasetConfig) -> BucketSettings:
        """Take the bucketing fields of ``dataset``."""
        return cls(
            resolution=(int(dataset.resolution[0]), int(dataset.resolution[1])),
            enable_bucket=dataset.enable_bucket,
            min_bucket_reso=dataset.min_bucket_reso,
            max_bucket_reso=dataset.max_bucket_reso,
            bucket_reso_steps=dataset.bucket_reso_steps,
            bucket_no_upscale=dataset.bucket_no_upscale,
        )

    def adjusted(self) -> BucketSettings:
        """Snap min/max bucket sides to the step and check them against the resolution.

        Like sd-scripts: ``min_bucket_reso`` is floored and ``max_bucket_reso`` ceiled to a
        multiple of ``bucket_reso_steps``. Without bucketing nothing is checked.

        Raises:
            DatasetError: a non-positive size or step, or a resolution outside
                ``[min_bucket_reso, max_bucket_reso]``.
        """
        width, height = self.resolution
        if width < 1 or height < 1:
            raise DatasetError(
                f"dataset.resolution: {width}x{height} is not a size",
                hint="use positive sizes, e.g. 512 or [512, 768]",
            )
        if not self.enable_bucket:
            return self
        step = self.bucket_reso_steps
        if step < 1:
            raise DatasetError(
                f"dataset.bucket_reso_steps: expected >= 1, got {step}", hint="use 64 (or 32)"
            )
        low = self.min_bucket_reso - self.min_bucket_reso % step
        high = self.max_bucket_reso + (-self.max_bucket_reso) % step
        if low < step:
            raise DatasetError(
                f"dataset.min_bucket_reso: {self.min_bucket_reso} is below one step ({step})",
                hint=f"use at least {step}, e.g. 256",
            )
        if min(width, height) < low or max(width, height) > high:
            raise DatasetError(
                f"dataset.resolution {width}x{height} lies outside the bucket range "
                f"min_bucket_reso={low} .. max_bucket_reso={high}",
                hint="lower min_bucket_reso or raise max_bucket_reso so the range holds the "
                "resolution",
            )
        return BucketSettings(self.resolution, True, low, high, step, self.bucket_no_upscale)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes.

    Attributes:
        bucket: the bucket ``(width, height)``; the training sample has exactly this size.
        resized: the image size after resizing, ``>= bucket`` on both sides (then cropped).
        aspect_error: bucket aspect ratio minus image aspect ratio (signed, as sd-scripts).
    """

    bucket: Size
    resized: Size
    aspect_error: float

    @property
    def excess(self) -> Size:
        """Pixels cropped away ``(horizontal, vertical)`` after resizing."""
        return self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]

    def center_crop(self) -> Size:
        """Top-left ``(left, top)`` of a centre crop (sd-scripts: ``excess // 2``)."""
        dx, dy = self.excess
        return dx // 2, dy // 2


def crop_origin(assignment: BucketAssignment, random_crop: bool, rng: random.Random) -> Size:
    """Top-left ``(left, top)`` of the crop in the resized image.

    Args:
        assignment: the image's bucket assignment.
        random_crop: a uniformly random offset per axis (inclusive, like sd-scripts'
            ``random.randint(0, excess)``; horizontal drawn first, only where there is excess);
            otherwise the centre crop.
        rng: the random source (only used for random crops).
    """
    if not random_crop:
        return assignment.center_crop()
    dx, dy = assignment.excess
    left = rng.randint(0, dx) if dx > 0 else 0
    top = rng.randint(0, dy) if dy > 0 else 0
    return left, top


class Bucketer:
    """Assigns image sizes to buckets for one :class:`BucketSettings`.

    Args:
        settings: the bucketing options; they are :meth:`~BucketSettings.adjusted` first.

    Raises:
        DatasetError: invalid settings (see :meth:`BucketSettings.adjusted`).
    """

    def __init__(self, settings: BucketSettings) -> None:
        self.settings = settings.adjusted()
        width, height = self.settings.resolution
        self.max_area = width * height
        self.no_upscale = self.settings.enable_bucket and self.settings.bucket_no_upscale
        if not self.settings.enable_bucket:
            self.resolutions: tuple[Size, ...] = ((width, height),)
        elif self.no_upscale:
            self.resolutions = ()  # buckets come from each image's own size
        else:
            s = self.settings
            self.resolutions = make_bucket_resolutions(
                s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps
            )
        self._resolution_set = frozenset(self.resolutions)
        self._ratios = tuple(w / h for w, h in self.resolutions)
        self.assign = lru_cache(maxsize=65536)(self._assign)

    def _assign(self, width: int, height: int) -> BucketAssignment:
        """The bucket of an image of displayed size ``width`` x ``height`` (cached per size)."""
        if width < 1 or height < 1:
            raise ValueError(f"not an image size: {width}x{height}")
        if self.no_upscale:
            bucket, resized = self._downscale_only(width, height)
        else:
            bucket, resized = self._predefined(width, height)
        # A zero-height bucket (bucket_no_upscale, image under one step) gets an infinite error;
        # the plan skips such images.
        ratio = bucket[0] / bucket[1] if bucket[1] else math.inf
        return BucketAssignment(bucket, resized, ratio - width / height)

    def _predefined(self, width: int, height: int) -> tuple[Size, Size]:
        aspect = width / height
        if (width, height) in self._resolution_set:
            bucket = (width, height)
        else:
            errors = [abs(ratio - aspect) for ratio in self._ratios]
            bucket = self.resolutions[errors.index(min(errors))]
        # Cover the bucket: match the side along which the image is relatively shorter.
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        return bucket, (_round_half_up(width * scale), _round_half_up(height * scale))

    def _downscale_only(self, width: int, height: int) -> tuple[Size, Size]:
        step = self.settings.bucket_reso_steps
        if width * height > self.max_area:
            resized = _shrink_to_area(width, height, self.max_area, step)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        return bucket, resized


def _shrink_to_area(width: int, height: int, max_area: int, step: int) -> Size:
    """sd-scripts' no-upscale shrink: round one side to the step, keep the better aspect ratio."""
    aspect = width / height
    ideal_width = math.sqrt(max_area * aspect)
    ideal_height = max_area / ideal_width

    def to_step(x: float) -> int:
        x_int = _round_half_up(x)
        return x_int - x_int % step

    width_first = to_step(ideal_width)
    height_for_width = to_step(width_first / aspect)
    height_first = to_step(ideal_height)
    width_for_height = to_step(height_first * aspect)
    # A zero here only happens for absurd aspect ratios; such images get a zero-sized bucket
    # and are skipped by the caller rather than dividing by zero.
    ratio_w = width_first / height_for_width if height_for_width else math.inf
    ratio_h = width_for_height / height_first if height_first else math.inf
    if abs(ratio_w - aspect) < abs(ratio_h - aspect):
        return width_first, _round_half_up(width_first / aspect)
    return _round_half_up(height_first * aspect), height_first


def _round_half_up(x: float) -> int:
    """``int(x + 0.5)`` as sd-scripts rounds (sizes are positive)."""
    return int(x + 0.5)
