"""Recipe subsets -> concrete image folders, with kohya's ``<repeats>_<identifier> <class>`` names.

A recipe subset's ``dir`` is either an image folder or, like sd-scripts' ``train_data_dir`` and
``reg_data_dir``, a parent of kohya-named image folders:

```
train/                     # dataset.subsets[0].dir = train
  20_sls frog/             # 20 repeats, class tokens "sls frog"
  5_sls frog closeup/      # 5 repeats, class tokens "sls frog closeup"
```

A folder that holds images directly is one subset; otherwise each child folder named
``<N>_<rest>`` (N >= 1) becomes a subset, in sorted order, and other children are ignored (as
sd-scripts does). Values the recipe sets (``repeats``, ``class_tokens``) win over the folder name.
Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.folders import FolderListing, list_folder
from loraforge.errors import DatasetError
from loraforge.recipe.problems import FIX_PATH_HINT
from loraforge.recipe.types import DatasetConfig, SubsetConfig

# sd-scripts: int(name.split("_")[0]) for the repeats, "_".join(rest) for the class tokens.
_KOHYA_NAME = re.compile(r"^\s*(\d+)_(.*)$", re.DOTALL)


@dataclass(frozen=True)
class FolderName:
    """What a kohya folder name says: ``"20_sls frog"`` -> repeats 20, class tokens "sls frog"."""

    repeats: int
    class_tokens: str | None


def parse_folder_name(name: str) -> FolderName | None:
    """Parse ``<repeats>_<identifier> <class>``; ``None`` when the name does not follow it.

    An empty remainder (``"10_"``) gives ``class_tokens=None``.
    """
    match = _KOHYA_NAME.match(name)
    if match is None:
        return None
    rest = match.group(2).strip()
    return FolderName(repeats=int(match.group(1)), class_tokens=rest or None)


@dataclass(frozen=True)
class ResolvedSubset:
    """One concrete image folder with its effective settings.

    Attributes:
        index: position in the resolved list.
        config_index: the recipe subset it comes from (``dataset.subsets[config_index]``).
        dir: the image folder.
        repeats: effective repeats (recipe, else folder name, else 1).
        class_tokens: fallback caption (recipe, else folder name, else ``None``).
        is_reg: regularization images.
        config: the recipe subset (caption and augmentation options).
        listing: the folder's listing, made while resolving (the scan reuses it).
    """

    index: int
    config_index: int
    dir: Path
    repeats: int
    class_tokens: str | None
    is_reg: bool
    config: SubsetConfig
    listing: FolderListing | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SubsetResolution:
    """Resolved subsets plus what was noticed on the way (ignored folders, empty subsets)."""

    subsets: tuple[ResolvedSubset, ...]
    warnings: tuple[str, ...]
    searched: tuple[Path, ...]


def subset_path(config_index: int) -> str:
    """The recipe field path of a subset's folder, for messages."""
    return f"dataset.subsets[{config_index}].dir"


def resolve_subsets(dataset: DatasetConfig) -> SubsetResolution:
    """Expand the recipe's subsets into image folders.

    Args:
        dataset: the recipe's dataset section.

    Returns:
        The folders in recipe order (children of a parent folder sorted by name), with warnings
        for ignored child folders and subsets without images or with 0 repeats.

    Raises:
        DatasetError: a subset's ``dir`` does not exist or is not a folder.
    """
    resolved: list[ResolvedSubset] = []
    warnings: list[str] = []
    searched: list[Path] = []
    for config_index, config in enumerate(dataset.subsets):
        folder = Path(config.dir)
        searched.append(folder)
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise DatasetError(
                f"{subset_path(config_index)}: {folder} {what}",
                hint=FIX_PATH_HINT,
            )
        for folder_dir, name, listing in _image_folders(folder, config_index, warnings):
            repeats = _choose(config.repeats, name.repeats if name else None, 1)
            class_tokens = _choose(config.class_tokens, name.class_tokens if name else None, None)
            if repeats < 1:
                warnings.append(f"{folder_dir}: 0 repeats, the subset is ignored")
                continue
            resolved.append(
                ResolvedSubset(
                    index=len(resolved),
                    config_index=config_index,
                    dir=folder_dir,
                    repeats=repeats,
                    class_tokens=class_tokens,
                    is_reg=config.is_reg,
                    config=config,
                    listing=listing,
                )
            )
    return SubsetResolution(tuple(resolved), tuple(warnings), tuple(searched))


def _choose(recipe_value, folder_value, default):
    if recipe_value is not None:
        return recipe_value
    if folder_value is not None:
        return folder_value
    return default


def _image_folders(
    folder: Path, config_index: int, warnings: list[str]
) -> list[tuple[Path, FolderName | None, FolderListing]]:
    """The image folder itself, or its kohya-named children when it holds no images."""
    listing = list_folder(folder)
    if listing.images:
        children = [c for c in listing.child_dirs if parse_folder_name(c.name)]
        if children:
            warnings.append(
                f"{folder}: holds images itself, so its {len(children)} sub-folder(s) "
                "are not read; move the images into a sub-folder to use both"
            )
        return [(folder, parse_folder_name(folder.name), listing)]
    found: list[tuple[Path, FolderName | None, FolderListing]] = []
    for child in listing.child_dirs:
        name = parse_folder_name(child.name)
        child_listing = list_folder(child)
        if name is None:
            if child_listing.images:
                warnings.append(
                    f"{child}: ignored, the name does not start with '<repeats>_' "
                    f"(e.g. '10_{child.name}'); or point {subset_path(config_index)} at it"
                )
            continue
        found.append((child, name, child_listing))
    if not found:
        warnings.append(f"{folder}: no images and no '<repeats>_<name>' sub-folders")
    return found
