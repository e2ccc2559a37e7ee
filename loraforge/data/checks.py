"""Filesystem validation of a recipe's dataset section, for ``loraforge check``.

Reports every finding at once as :class:`~loraforge.recipe.problems.Problem` objects (no
exception for user errors). Invalid bucket settings are errors. Missing subset folders, subsets
without usable images and an empty dataset have the severity the caller picks (``empty``:
"warning" suits presets whose folders are still to be filled, "error" a pipeline about to train).
Bad image files, unusable caption files and other findings are warnings (``check --strict``
decides whether those fail). Torch-free.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loraforge.data.buckets import BucketSettings
from loraforge.data.discovery import Discovery, discover
from loraforge.data.plan import plan_buckets
from loraforge.data.subsets import subset_path
from loraforge.errors import DatasetError
from loraforge.recipe.problems import FIX_PATH_HINT, Problem, Severity
from loraforge.recipe.types import DatasetConfig


def check_dataset(dataset: DatasetConfig, empty: Severity = "error") -> list[Problem]:
    """Check that the dataset's folders exist and hold usable images.

    Args:
        dataset: the recipe's dataset section (paths already absolute).
        empty: severity of a missing folder, a subset without usable images, and an empty
            dataset (default "error").

    Returns:
        Problems, errors first; empty when everything is usable.
    """
    problems: list[Problem] = []
    try:
        BucketSettings.from_dataset(dataset).adjusted()
    except DatasetError as e:
        problems.append(Problem("error", e.message, path="dataset", hint=e.hint))
    present: list[int] = []  # indices of the subsets whose folder exists
    for index, subset in enumerate(dataset.subsets):
        folder = Path(subset.dir)
        if folder.is_dir():
            present.append(index)
            continue
        what = "does not exist" if not folder.exists() else "is not a folder"
        problems.append(
            Problem(
                empty,
                f"{folder} {what}",
                path=subset_path(index),
                hint=FIX_PATH_HINT,
            )
        )
    if present:
        problems += _check_contents(dataset, present, empty)
    return sorted(problems, key=lambda p: p.severity != "error")


def _check_contents(full: DatasetConfig, indices: list[int], empty: Severity) -> list[Problem]:
    present = replace(full, subsets=tuple(full.subsets[i] for i in indices))
    try:
        found = discover(present)
    except DatasetError as e:
        return [Problem(empty, e.message, path="dataset.subsets", hint=e.hint)]
    problems = _empty_subsets(found, present, indices, empty)
    problems += [
        Problem("warning", f"{issue.path}: {issue.reason}", path="dataset.subsets")
        for issue in found.skipped
    ]
    problems += [
        Problem("warning", f"caption {issue.path}: {issue.reason}", path="dataset.subsets")
        for issue in found.caption_issues
    ]
    problems += [Problem("warning", text, path="dataset.subsets") for text in found.warnings]
    try:
        plan = plan_buckets(found, BucketSettings.from_dataset(present))
    except DatasetError as e:
        return [*problems, Problem("error", e.message, path="dataset", hint=e.hint)]
    problems += [
        Problem("warning", f"{issue.path}: {issue.reason}", path="dataset.bucket_no_upscale")
        for issue in plan.skipped
    ]
    return problems


def _empty_subsets(
    found: Discovery, present: DatasetConfig, indices: list[int], empty: Severity
) -> list[Problem]:
    """A problem for each recipe subset that contributes no usable image (``indices``: the
    recipe index of each subset of ``present``)."""
    used = {found.subsets[image.subset].config_index for image in found.images}
    unused_dirs = {path.parent for path in found.unused_reg_images}
    used |= {s.config_index for s in found.subsets if s.dir in unused_dirs}
    problems = []
    for present_index, subset in enumerate(present.subsets):
        if present_index in used:
            continue
        problems.append(
            Problem(
                empty,
                f"{subset.dir} holds no usable images",
                path=subset_path(indices[present_index]),
                hint="add images (png, jpg, webp, ...) or '<repeats>_<class>' sub-folders with "
                "images, or remove the subset",
            )
        )
    return problems
