"""Dataset discovery: the recipe's dataset section -> every image training will see.

For each resolved subset (see :mod:`loraforge.data.subsets`) the image files are listed, their
displayed sizes read from headers (no pixel decoding), and their captions read. Bad files are
skipped with a reason and never stop the scan. Regularization images are then balanced against
the training images exactly as sd-scripts' ``DreamBoothDataset`` does (see
:func:`balance_reg_repeats`). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

from loraforge.data.caption_files import read_caption
from loraforge.data.folders import list_folder
from loraforge.data.holdout import split_subset
from loraforge.data.images import BadImageError, read_image_size, verify_image
from loraforge.data.subsets import ResolvedSubset, resolve_subsets
from loraforge.errors import DatasetError
from loraforge.recipe.types import DatasetConfig

CaptionSource = Literal["file", "class_tokens", "none"]


class FileIssue(NamedTuple):
    """A file with a problem and the reason, e.g. ``(Path("a.png"), "truncated")``."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageRecord:
    """One usable image.

    Attributes:
        path: the image file.
        size: displayed ``(width, height)`` (EXIF orientation applied).
        subset: index into :attr:`Discovery.subsets`.
        caption: the raw caption (first line, or all lines with wildcards), before training-time
            processing (:mod:`loraforge.data.captions`).
        caption_source: ``"file"``, ``"class_tokens"`` (no usable caption file) or ``"none"``.
        is_reg: a regularization image.
        repeats: how often it appears per epoch (reg images: after balancing).
    """

    path: Path
    size: tuple[int, int]
    subset: int
    caption: str
    caption_source: CaptionSource
    is_reg: bool
    repeats: int

    @property
    def key(self) -> str:
        """A stable identifier for caches: the absolute path as a string."""
        return str(self.path)


@dataclass(frozen=True)
class Discovery:
    """Everything discovery found.

    Attributes:
        images: usable images, training subsets first then regularization, each in file order;
            reg images that the balance leaves unused are not included.
        skipped: unusable image files with reasons.
        caption_issues: caption files that exist but could not be used (the image falls back to
            its class tokens).
        subsets: the resolved image folders.
        warnings: other findings worth showing (ignored folders, missing captions, unused reg).
        searched: the recipe folders searched.
        unused_reg_images: reg images beyond what the training images need.
        num_train_images: training images x repeats (one epoch's training samples).
        num_reg_images: reg images x their folder repeats, before balancing.
        validation: held-out images (``dataset.validation_split``, ``is_validation`` subsets),
            never trained on (see :mod:`loraforge.data.holdout`).
    """

    images: tuple[ImageRecord, ...]
    skipped: tuple[FileIssue, ...]
    caption_issues: tuple[FileIssue, ...]
    subsets: tuple[ResolvedSubset, ...]
    warnings: tuple[str, ...]
    searched: tuple[Path, ...]
    unused_reg_images: tuple[Path, ...]
    num_train_images: int
    num_reg_images: int
    validation: tuple[ImageRecord, ...] = ()

    @property
    def num_samples(self) -> int:
        """Samples per epoch: every image x its repeats (reg included, after balancing)."""
        return sum(image.repeats for image in self.images)


def discover(
    dataset: DatasetConfig, workers: int | None = None, *, verify: bool = False
) -> Discovery:
    """Find the images, sizes and captions of a dataset.

    Args:
        dataset: the recipe's dataset section.
        workers: threads reading image headers (default: a few per CPU; 1 = sequential).
        verify: also decode every image (as training does), so a file whose header reads but
            whose pixels do not is skipped with a reason here, never in the middle of a run.

    Returns:
        A :class:`Discovery`.

    Raises:
        DatasetError: a subset folder is missing, or no usable training image was found
            (the message names every folder searched).
    """
    resolution = resolve_subsets(dataset)
    warnings = list(resolution.warnings)
    skipped: list[FileIssue] = []
    caption_issues: list[FileIssue] = []
    records: list[ImageRecord] = []
    held_out: list[ImageRecord] = []
    seen_dirs: set[Path] = set()
    count = _worker_count(workers)
    with ThreadPoolExecutor(max_workers=count) if count > 1 else _no_pool() as pool:
        for subset in resolution.subsets:
            if subset.dir in seen_dirs:
                warnings.append(f"{subset.dir}: listed twice, the second subset is ignored")
                continue
            seen_dirs.add(subset.dir)
            scanned = _scan_subset(subset, pool, verify)
            split = split_subset(
                len(scanned.records), subset, dataset.validation_split, dataset.validation_seed
            )
            records += [scanned.records[i] for i in split.train]
            held_out += [scanned.records[i] for i in split.validation]
            if split.validation and not split.train and not subset.config.is_validation:
                warnings.append(
                    f"{subset.dir}: all {len(split.validation)} image(s) are held out for "
                    "validation (dataset.validation_split), none is trained on"
                )
            skipped += scanned.skipped
            caption_issues += scanned.caption_issues
            warnings += scanned.warnings
    train = [r for r in records if not r.is_reg]
    reg = [r for r in records if r.is_reg]
    if not train:
        raise _empty_dataset_error(resolution.searched, reg, skipped, len(held_out))
    num_train = sum(r.repeats for r in train)
    num_reg = sum(r.repeats for r in reg)
    balanced = balance_reg_repeats(num_train, reg)
    used_reg_paths = {r.path for r in balanced}
    unused = tuple(r.path for r in reg if r.path not in used_reg_paths)
    if unused:
        warnings.append(
            f"{len(unused)} regularization image(s) are not used: the reg images x repeats "
            f"({num_reg}) exceed the training images x repeats ({num_train})"
        )
    return Discovery(
        images=tuple(train) + tuple(balanced),
        skipped=tuple(skipped),
        caption_issues=tuple(caption_issues),
        subsets=resolution.subsets,
        warnings=tuple(warnings),
        searched=resolution.searched,
        unused_reg_images=unused,
        num_train_images=num_train,
        num_reg_images=num_reg,
        validation=tuple(held_out),
    )


def balance_reg_repeats(num_train_images: int, reg: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Give regularization images the repeats sd-scripts gives them.

    sd-scripts (``DreamBoothDataset.__init__``) walks the reg images in order, registering each with
    its folder repeats until the running total reaches ``num_train_images`` (later reg images
    are never used); if one pass is not enough, further passes add one repeat per image, in order,
    until the total reaches ``num_train_images``.

    Args:
        num_train_images: training images x repeats.
        reg: the regularization images in order, ``repeats`` = folder repeats.

    Returns:
        The reg images that are used, with their balanced repeats (empty when
        ``num_train_images`` is 0 or there are no reg images).
    """
    repeats: list[int] = []
    total = 0
    first_pass = True
    while reg and total < num_train_images:
        for i, record in enumerate(reg):
            if first_pass:
                repeats.append(record.repeats)
                total += record.repeats
            else:
                repeats[i] += 1
                total += 1
            if total >= num_train_images:
                break
        first_pass = False
    return [replace(record, repeats=n) for record, n in zip(reg, repeats, strict=False)]


@dataclass(frozen=True)
class _Scanned:
    records: list[ImageRecord]
    skipped: list[FileIssue]
    caption_issues: list[FileIssue]
    warnings: list[str]


def _scan_subset(subset: ResolvedSubset, pool: ThreadPoolExecutor | None, verify: bool) -> _Scanned:
    listing = subset.listing or list_folder(subset.dir)
    paths, odd, folder_names = listing.images, listing.odd, listing.names
    records: list[ImageRecord] = []
    skipped: list[FileIssue] = [FileIssue(path, reason) for path, reason in odd]
    caption_issues: list[FileIssue] = []
    missing = 0
    for path, size in zip(paths, _sizes(paths, pool, verify), strict=True):
        if isinstance(size, FileIssue):
            skipped.append(size)
            continue
        caption, source, issue = _caption_for(path, subset, folder_names)
        if issue is not None:
            caption_issues.append(issue)
        missing += source != "file"
        records.append(
            ImageRecord(path, size, subset.index, caption, source, subset.is_reg, subset.repeats)
        )
    warnings: list[str] = []
    if not paths:
        warnings.append(f"{subset.dir}: no image files, the subset is ignored")
    elif missing:
        fallback = (
            f"the class tokens {subset.class_tokens!r}"
            if subset.class_tokens is not None
            else "an empty caption (no class tokens: name the folder '<repeats>_<class>' "
            "or set class_tokens)"
        )
        warnings.append(
            f"{subset.dir}: {missing} of {len(records)} image(s) have no usable "
            f"'{subset.config.caption_extension}' caption and use {fallback}"
        )
    return _Scanned(records, skipped, caption_issues, warnings)


_CHUNK = 256  # header reads per thread task: large enough to amortise the hand-off


def _sizes(
    paths: list[Path], pool: ThreadPoolExecutor | None, verify: bool = False
) -> list[tuple[int, int] | FileIssue]:
    chunk = _CHUNK // 16 if verify else _CHUNK  # decoding is far slower than a header read
    if pool is None or len(paths) <= chunk:
        return [_size_or_issue(p, verify) for p in paths]
    chunks = [(paths[i : i + chunk], verify) for i in range(0, len(paths), chunk)]
    return [size for part in pool.map(_sizes_of_chunk, chunks) for size in part]


def _sizes_of_chunk(job: tuple[list[Path], bool]) -> list[tuple[int, int] | FileIssue]:
    paths, verify = job
    return [_size_or_issue(p, verify) for p in paths]


def _size_or_issue(path: Path, verify: bool = False) -> tuple[int, int] | FileIssue:
    try:
        size = read_image_size(path)
        if verify:
            verify_image(path)
        return size
    except BadImageError as e:
        return FileIssue(path, e.reason)


def _caption_for(
    path: Path, subset: ResolvedSubset, folder_names: frozenset[str]
) -> tuple[str, CaptionSource, FileIssue | None]:
    config = subset.config
    found = read_caption(path, config.caption_extension, config.enable_wildcard, folder_names)
    issue = FileIssue(found.path, found.problem) if found.problem else None
    if found.text:
        return found.text, "file", issue
    if found.text == "":
        issue = FileIssue(found.path, "empty caption (blank file or blank first line)")
    if subset.class_tokens is not None:
        return subset.class_tokens, "class_tokens", issue
    return "", "none", issue


@contextlib.contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def _worker_count(workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    # Header reads wait on the disk more than on the CPU: a few threads per core help on network
    # and spinning storage and cost little elsewhere.
    return min(16, 4 * (os.cpu_count() or 1))


def _empty_dataset_error(
    searched: Sequence[Path],
    reg: Sequence[ImageRecord],
    skipped: Sequence[FileIssue],
    held_out: int = 0,
) -> DatasetError:
    folders = ", ".join(str(p) for p in searched)
    detail = ""
    if held_out:
        detail = f" ({held_out} image(s) found, all held out for validation)"
    elif reg:
        detail = f" ({len(reg)} regularization image(s) found, but reg images need training images)"
    elif skipped:
        first = skipped[0]
        detail = f" ({len(skipped)} image file(s) found, all unusable, e.g. {first.path.name}: "
        detail += f"{first.reason})"
    return DatasetError(
        f"no usable training images found in: {folders}{detail}",
        hint="put .png/.jpg/.webp images in the subset folders (or in '<repeats>_<class>' "
        "sub-folders) and check dataset.subsets[].dir in the recipe",
    )
