"""Loss masks (``training.masked_loss``): where each image's mask comes from, and the mask cut to
the training sample exactly as its pixels are (resized to the bucket, cropped, flipped).

A subset's masks come, as in sd-scripts, from

- the images' own alpha channel (``alpha_mask: true``): transparent = not learned; an image
  without transparency is fully opaque (weight 1 everywhere);
- a mask folder (``conditioning_data_dir``): one image per training image with the same file
  name stem (any image extension) and the same size; its red channel is the weight (white = 1,
  black = 0). A subset ``dir`` holding ``<repeats>_<name>`` folders may keep the masks in
  sub-folders of the same names.

Masks are 8-bit (like the alpha channel sd-scripts resizes with its RGBA image) and go through
:func:`loraforge.data.transforms.resize_and_crop`, the pixels' own resize and crop. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from loraforge.data.buckets import BucketAssignment, Size
from loraforge.data.discovery import ImageRecord
from loraforge.data.folders import image_entries
from loraforge.data.images import (
    BadImageError,
    load_image_and_alpha,
    load_image_rgb,
    read_image_size,
)
from loraforge.data.subsets import ResolvedSubset, subset_path
from loraforge.data.transforms import flip_horizontal, resize_and_crop
from loraforge.errors import DatasetError

MaskKind = Literal["alpha", "file"]


@dataclass(frozen=True)
class MaskSource:
    """Where one image's loss mask comes from.

    Attributes:
        kind: ``alpha`` (the image's alpha channel) or ``file`` (a mask image).
        path: the image itself (``alpha``) or the mask file (``file``).
    """

    kind: MaskKind
    path: Path

    def identity(self) -> str:
        """What a cached mask depends on beyond its image (the mask file's size and time)."""
        if self.kind == "alpha":
            return "alpha"
        stat = self.path.stat()
        return f"file:{self.path.name}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class MaskLookup:
    """The masks of a dataset's images.

    Attributes:
        sources: mask source by image key (images of subsets without a mask source are absent).
        missing: ``(subset index, image)`` for images of a mask-folder subset without a mask.
        folders: the mask folder of each subset that has one, by subset index.
    """

    sources: Mapping[str, MaskSource]
    missing: tuple[tuple[int, Path], ...]
    folders: Mapping[int, Path]


def mask_folder(subset: ResolvedSubset) -> Path | None:
    """The folder holding ``subset``'s masks: ``conditioning_data_dir``, or its sub-folder named
    like the subset's folder when the subset is a ``<repeats>_<name>`` child of ``dir``."""
    configured = subset.config.conditioning_data_dir
    if configured is None:
        return None
    folder = Path(configured)
    child = folder / subset.dir.name
    if subset.dir != Path(subset.config.dir) and child.is_dir():
        return child
    return folder


def find_masks(images: Sequence[ImageRecord], subsets: Sequence[ResolvedSubset]) -> MaskLookup:
    """Match every image to its mask source (a mask file is matched by file name stem).

    A mask folder that does not exist leaves all its subset's images missing.
    """
    folders = {s.index: f for s in subsets if (f := mask_folder(s)) is not None}
    stems = {index: _masks_by_stem(folder) for index, folder in folders.items()}
    sources: dict[str, MaskSource] = {}
    missing: list[tuple[int, Path]] = []
    for record in images:
        subset = subsets[record.subset]
        if record.subset in stems:
            found = stems[record.subset].get(record.path.stem)
            if found is None:
                missing.append((record.subset, record.path))
            else:
                sources[record.key] = MaskSource("file", found)
        elif subset.config.alpha_mask:
            sources[record.key] = MaskSource("alpha", record.path)
    return MaskLookup(sources, tuple(missing), folders)


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files, _ = image_entries(folder)
    found: dict[str, Path] = {}
    for path in files:  # sorted: with a.png and a.jpg both there, the first wins
        found.setdefault(path.stem, path)
    return found


def require_masks(
    images: Sequence[ImageRecord], subsets: Sequence[ResolvedSubset]
) -> dict[str, MaskSource]:
    """Every image's mask source, for a run with masked loss, checked before it starts.

    Raises:
        DatasetError: a subset has no mask source, images of a mask folder have no mask, or a
            mask's size differs from its image's (naming the subset or the file).
    """
    for index in sorted({record.subset for record in images}):
        subset = subsets[index]
        if subset.config.conditioning_data_dir is None and not subset.config.alpha_mask:
            raise DatasetError(
                f"{subset_path(subset.config_index)}: {subset.dir} has no masks for "
                "training.masked_loss",
                hint="set alpha_mask: true or conditioning_data_dir on the subset",
            )
    lookup = find_masks(images, subsets)
    problems = mask_problems(lookup, images, subsets)
    if problems:
        path, message, hint = problems[0]
        raise DatasetError(f"{path}: {message}", hint=hint)
    sizes = mask_size_problems(lookup.sources, images)
    if sizes:
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        raise DatasetError(sizes[0] + more, hint="make each mask the same size as its image")
    return dict(lookup.sources)


def mask_problems(
    lookup: MaskLookup, images: Sequence[ImageRecord], subsets: Sequence[ResolvedSubset]
) -> list[tuple[str, str, str]]:
    """``(recipe path, message, hint)`` for each mask folder that is missing or lacks masks of
    its subset's images."""
    problems = []
    for index in sorted({record.subset for record in images}):
        subset = subsets[index]
        folder = lookup.folders.get(index)
        lacking = [path for i, path in lookup.missing if i == index]
        if folder is None or not lacking:
            continue
        field = f"dataset.subsets[{subset.config_index}].conditioning_data_dir"
        if not folder.is_dir():
            message = f"mask folder {folder} of {subset.dir} does not exist"
            problems.append((field, message, "create it, or fix the path"))
            continue
        names = ", ".join(p.name for p in lacking[:3])
        names += f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        message = f"mask folder {folder} has no mask for {len(lacking)} image(s) of {subset.dir}"
        hint = "add a mask with the same file name (any image extension) for each image"
        problems.append((field, f"{message}: {names}", hint))
    return problems


def mask_size_problems(
    sources: Mapping[str, MaskSource], images: Sequence[ImageRecord]
) -> list[str]:
    """Mask files whose size (read from the header) differs from their image's."""
    found = []
    for record in images:
        source = sources.get(record.key)
        if source is None or source.kind != "file":
            continue
        try:
            size = read_image_size(source.path)
        except BadImageError as e:
            found.append(f"mask {source.path}: {e.reason}")
            continue
        if size != record.size:
            found.append(_size_message(source.path, size, record.path, record.size))
    return found


def _size_message(mask: Path, size: Size, image: Path, image_size: Size) -> str:
    return (
        f"mask {mask} is {size[0]}x{size[1]} but its image {image.name} is "
        f"{image_size[0]}x{image_size[1]}"
    )


def load_mask(source: MaskSource, size: Size, alpha: Image.Image | None = None) -> Image.Image:
    """The mask at its image's displayed size, as an upright mode ``"L"`` image.

    Args:
        source: where it comes from.
        size: the image's displayed ``(width, height)``.
        alpha: the image's alpha channel, when the caller decoded the image already
            (:func:`loraforge.data.images.load_image_and_alpha`; ``None``: read it here).

    Raises:
        BadImageError: the mask cannot be read, or its size differs from the image's.
    """
    if source.kind == "alpha":
        if alpha is None:
            alpha = load_image_and_alpha(source.path)[1]
        return alpha if alpha is not None else Image.new("L", size, 255)
    mask = load_image_rgb(source.path).getchannel("R")
    if mask.size != size:
        raise BadImageError(
            source.path,
            _size_message(source.path, mask.size, source.path, size),
            hint="make each mask the same size as its image",
        )
    return mask


def sample_mask(
    mask: Image.Image, assignment: BucketAssignment, origin: Size, flipped: bool
) -> np.ndarray:
    """``(H, W)`` float32 weights in ``[0, 1]`` of the training sample: ``mask`` resized and
    cropped like the pixels (:func:`resize_and_crop`), mirrored when the sample is."""
    values = np.array(resize_and_crop(mask, assignment, origin), dtype=np.uint8)
    if flipped:
        values = flip_horizontal(values)
    return values.astype(np.float32) / 255.0
