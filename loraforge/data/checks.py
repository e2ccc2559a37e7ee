"""Filesystem validation of a recipe's dataset section, for ``loraforge check`` and every command
that reads the dataset.

Reports every finding at once as :class:`~loraforge.recipe.problems.Problem` objects (no
exception for user errors), with the severity training gives it: what makes ``loraforge train``
stop is an error (invalid bucket settings, a missing subset folder, no usable training image at
all); what training skips or works around is a warning (a subset without usable images beside
others that have some, bad image files, missing or unusable captions). Torch-free.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loraforge.data.buckets import BucketSettings
from loraforge.data.discovery import Discovery, discover
from loraforge.data.holdout import missing_held_out_error
from loraforge.data.plan import plan_buckets
from loraforge.data.subsets import ResolvedSubset, subset_path
from loraforge.errors import DatasetError
from loraforge.recipe.problems import FIX_PATH_HINT, Problem
from loraforge.recipe.types import DatasetConfig, SubsetConfig


def check_dataset(
    dataset: DatasetConfig, *, read_files: bool = True, masked_loss: bool = False
) -> list[Problem]:
    """Check the bucket settings and that the dataset's folders exist and hold usable images.

    Args:
        dataset: the recipe's dataset section (paths already absolute).
        read_files: also look at the folders and images (``False``: the bucket settings only,
            for checking a recipe without its data).
        masked_loss: the run masks the loss (``training.masked_loss``): every image of a subset
            with a mask folder needs a mask of its size there.

    Returns:
        Problems, errors first; empty when everything is usable.
    """
    problems = bucket_settings_problems(dataset)
    settings_valid = not problems
    if not read_files:
        return problems
    present: list[int] = []  # indices of the subsets whose folder exists
    for index, subset in enumerate(dataset.subsets):
        folder = Path(subset.dir)
        if folder.is_dir():
            present.append(index)
            continue
        what = "does not exist" if not folder.exists() else "is not a folder"
        problems.append(
            Problem(
                "error",
                f"{folder} {what}: train will stop",
                path=subset_path(index),
                hint=FIX_PATH_HINT,
            )
        )
    if present:
        problems += _check_contents(dataset, present, plan=settings_valid, masks=masked_loss)
    return sorted(problems, key=lambda p: p.severity != "error")


def bucket_settings_problems(dataset: DatasetConfig) -> list[Problem]:
    """The bucket settings training would refuse (no files read)."""
    try:
        BucketSettings.from_dataset(dataset).adjusted()
    except DatasetError as e:
        return [Problem("error", e.message, path="dataset", hint=e.hint)]
    return []


def _check_contents(
    full: DatasetConfig, indices: list[int], *, plan: bool, masks: bool
) -> list[Problem]:
    """Findings of discovery over the subsets at ``indices`` (and of bucketing, when ``plan``
    and the settings are valid; and of the mask folders, with ``masks``)."""
    present = replace(full, subsets=tuple(full.subsets[i] for i in indices))
    try:
        found = discover(present)
    except DatasetError as e:
        return [Problem("error", e.message, path="dataset.subsets", hint=e.hint)]
    empty = _empty_subsets(found, present)
    problems = [_empty_subset_problem(present.subsets[i], indices[i]) for i in empty]
    # discovery's own notes about those folders would say the same twice
    said = tuple(f"{present.subsets[i].dir}:" for i in empty)
    problems += [
        Problem("warning", f"{issue.path}: {issue.reason}", path="dataset.subsets")
        for issue in found.skipped
    ]
    problems += [
        Problem("warning", f"caption {issue.path}: {issue.reason}", path="dataset.subsets")
        for issue in found.caption_issues
    ]
    problems += [
        Problem("warning", text, path="dataset.subsets")
        for text in found.warnings
        if not text.startswith(said)
    ]
    if masks:
        problems += _mask_findings(found, indices)
    if not plan:
        return problems + _held_out_problems(present, len(found.validation))
    try:
        buckets = plan_buckets(found, BucketSettings.from_dataset(present))
    except DatasetError as e:
        return [*problems, Problem("error", e.message, path="dataset", hint=e.hint)]
    problems += [
        Problem("warning", f"{issue.path}: {issue.reason}", path="dataset.bucket_no_upscale")
        for issue in buckets.skipped
    ]
    return problems + _held_out_problems(present, len(buckets.validation))


def _held_out_problems(present: DatasetConfig, num_held_out: int) -> list[Problem]:
    """An error when the recipe asks for validation and no image is held out (train stops)."""
    missing = missing_held_out_error(present, num_held_out)
    if missing is None:
        return []
    field = "dataset.validation_split" if present.validation_split > 0 else "dataset.subsets"
    message = missing.message.removeprefix("dataset: ") + ": train will stop"
    return [Problem("error", message, path=field, hint=missing.hint)]


def _empty_subsets(found: Discovery, present: DatasetConfig) -> list[int]:
    """Positions in ``present`` of the subsets that contribute no usable image (training
    ignores them)."""
    used = {found.subsets[image.subset].config_index for image in found.images}
    used |= {found.subsets[image.subset].config_index for image in found.validation}
    unused_dirs = {path.parent for path in found.unused_reg_images}
    used |= {s.config_index for s in found.subsets if s.dir in unused_dirs}
    return [index for index in range(len(present.subsets)) if index not in used]


def _empty_subset_problem(subset: SubsetConfig, recipe_index: int) -> Problem:
    return Problem(
        "warning",
        f"{subset.dir} holds no usable images; training ignores it",
        path=subset_path(recipe_index),
        hint="add images (png, jpg, webp, ...) or '<repeats>_<class>' sub-folders with images, "
        "or remove the subset",
    )


def _mask_findings(found: Discovery, indices: list[int]) -> list[Problem]:
    """Mask folders that are missing or lack masks, and masks of the wrong size (train stops
    on each). ``indices`` maps the checked subsets back to their place in the recipe."""
    from loraforge.data.masks import find_masks, mask_problems, mask_size_problems

    # discovery numbered the subsets of the checked part of the recipe
    subsets = [replace(s, config_index=indices[s.config_index]) for s in found.subsets]
    lookup = find_masks(found.images, subsets)
    problems = [
        Problem("error", f"{message}: train will stop", path=path, hint=hint)
        for path, message, hint in mask_problems(lookup, found.images, subsets)
    ]
    problems += [
        Problem(
            "error",
            f"{message}: train will stop",
            path="dataset.subsets",
            hint="make each mask the same size as its image",
        )
        for message in mask_size_problems(lookup.sources, found.images)
    ]
    return problems + _opaque_alpha_subsets(found, subsets)


def _opaque_alpha_subsets(found: Discovery, subsets: list[ResolvedSubset]) -> list[Problem]:
    """Subsets masked by their alpha channel where no image has one: nothing is masked."""
    from loraforge.data.images import has_transparency

    problems = []
    for subset in subsets:
        if subset.config.conditioning_data_dir is not None or not subset.config.alpha_mask:
            continue
        paths = [image.path for image in found.images if image.subset == subset.index]
        if paths and not any(has_transparency(path) for path in paths):
            problems.append(
                Problem(
                    "warning",
                    f"no image of {subset.dir} has transparency: its loss is not masked",
                    path=f"dataset.subsets[{subset.config_index}].alpha_mask",
                    hint="save the images with an alpha channel (PNG, WebP), or use "
                    "conditioning_data_dir",
                )
            )
    return problems
