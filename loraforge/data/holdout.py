"""Held-out validation images: ``dataset.validation_split`` and ``is_validation`` subsets.

sd-scripts (``train_util.split_train_val``) shuffles each subset's images with
``validation_seed`` and holds out the last ``round(n * validation_split)``. Its training side
keeps the first ``ceil(n * (1 - split))``, which can overlap the held-out part (10 images at
0.15: 9 trained, 2 held out); here the two sides never overlap, so a held-out image is never
trained on. The shuffle starts from the images in file order, so the choice depends only on the
file names, the split and the seed. Regularization subsets are never split (as sd-scripts).
Nothing here imports torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loraforge.data.subsets import ResolvedSubset
from loraforge.errors import DatasetError
from loraforge.recipe.types import DatasetConfig


@dataclass(frozen=True)
class HoldOut:
    """Which images of one subset are trained on and which are held out.

    Attributes:
        train: indices (into the subset's image list) trained on, in file order.
        validation: indices held out, in file order.
    """

    train: tuple[int, ...]
    validation: tuple[int, ...]


def held_out_count(num_images: int, validation_split: float) -> int:
    """How many of a subset's ``num_images`` are held out: ``round(n * split)`` (sd-scripts)."""
    return round(num_images * validation_split)


def split_subset(
    num_images: int, subset: ResolvedSubset, validation_split: float, validation_seed: int
) -> HoldOut:
    """Split one subset's images (in file order) into trained and held-out ones.

    Args:
        num_images: the subset's usable images.
        subset: the subset (``is_validation`` holds every image out; ``is_reg`` none).
        validation_split: ``dataset.validation_split``.
        validation_seed: ``dataset.validation_seed``; the subset's index is mixed in, so two
            subsets of the same size do not hold out the same positions.
    """
    everything = tuple(range(num_images))
    if subset.config.is_validation:
        return HoldOut((), everything)
    count = 0 if subset.is_reg else held_out_count(num_images, validation_split)
    if count == 0:
        return HoldOut(everything, ())
    order = list(everything)
    random.Random(f"{validation_seed}:{subset.index}").shuffle(order)
    held = set(order[num_images - count :])
    return HoldOut(
        tuple(i for i in everything if i not in held), tuple(i for i in everything if i in held)
    )


def validation_requested(dataset: DatasetConfig) -> bool:
    """Whether a dataset asks for held-out images (a split, or an ``is_validation`` subset)."""
    return dataset.validation_split > 0 or any(s.is_validation for s in dataset.subsets)


def missing_held_out_error(dataset: DatasetConfig, num_held_out: int) -> DatasetError | None:
    """The error when the dataset asks for validation but holds no image out; else ``None``."""
    if num_held_out or not validation_requested(dataset):
        return None
    return DatasetError(
        "dataset: validation is asked for, but no image is held out (validation_split rounds "
        "to 0 images in every training subset, or the is_validation subsets have no usable image)",
        hint="raise dataset.validation_split, or add a subset with is_validation: true",
    )
