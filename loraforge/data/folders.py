"""Dataset folders: which entries are images, in one listing per folder.

A dataset scan needs three things from a folder: its image files, the entries that are named
like images but cannot be read as files (a dangling link, a folder called ``x.png``), and the
names of everything in it (to find caption files without a failed ``open`` per image); the
subset resolver also needs its sub-folders. :func:`list_folder` answers all of them from one
``os.scandir``, so a dataset of thousands of one-image folders lists each folder once.

Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.images import IMAGE_EXTENSIONS
from loraforge.errors import DatasetError

__all__ = ["FolderListing", "image_entries", "is_image_file", "list_folder", "list_image_files"]

_NOT_A_FOLDER_HINT = (
    "check the dataset path in the recipe (relative paths are relative to the recipe)"
)


def is_image_file(path: Path | str) -> bool:
    """Whether ``path`` has an image extension (case-insensitive) and is not a hidden file."""
    name = os.path.basename(path)
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


@dataclass(frozen=True)
class FolderListing:
    """What one listing of a folder found.

    Attributes:
        images: the image files directly in the folder, sorted.
        odd: entries named like images that are not readable files, with the reason, sorted.
        names: every entry's name, lower-cased (case-insensitive file systems find ``A.TXT``).
        child_dirs: the sub-folders that are not hidden, sorted.
    """

    images: list[Path]
    odd: list[tuple[Path, str]]
    names: frozenset[str]
    child_dirs: list[Path]


def list_folder(folder: Path) -> FolderListing:
    """List ``folder`` once.

    Raises:
        DatasetError: ``folder`` does not exist or is not a directory.
    """
    images, odd, names, child_dirs = [], [], [], []
    try:
        # DirEntry.is_file()/is_dir() usually answer from the listing itself, without a stat.
        with os.scandir(folder) as entries:
            for entry in entries:
                names.append(entry.name.lower())
                is_dir = entry.is_dir()
                if is_dir and not entry.name.startswith("."):
                    child_dirs.append(Path(entry.path))
                if not is_image_file(entry.name):
                    continue
                if is_dir:
                    odd.append((Path(entry.path), "a folder, not an image file"))
                elif entry.is_file():
                    images.append(Path(entry.path))
                elif entry.is_symlink():
                    odd.append((Path(entry.path), "a link to a file that does not exist"))
                else:
                    odd.append((Path(entry.path), "not a regular file"))
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(f"{folder}: not a directory", hint=_NOT_A_FOLDER_HINT) from None
    return FolderListing(sorted(images), sorted(odd), frozenset(names), sorted(child_dirs))


def image_entries(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files directly in ``folder`` and the odd image-named entries, both sorted
    (see :class:`FolderListing`).

    Raises:
        DatasetError: ``folder`` is not a directory.
    """
    listing = list_folder(folder)
    return listing.images, listing.odd


def list_image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder``, sorted by path.

    Args:
        folder: the directory to list.
        recursive: also descend into sub-directories (default False, like sd-scripts).

    Returns:
        Paths with an extension in :data:`~loraforge.data.images.IMAGE_EXTENSIONS` (any case),
        hidden files (``.name``, e.g. macOS ``._x.jpg`` resource forks) excluded, sorted.

    Raises:
        DatasetError: ``folder`` does not exist or is not a directory.
    """
    folder = Path(folder)
    if not recursive:
        return list_folder(folder).images
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory", hint=_NOT_A_FOLDER_HINT)
    found = [
        Path(root) / name
        for root, dirs, names in os.walk(folder)
        for name in names
        if not _in_hidden_dir(Path(root), folder)
    ]
    return sorted(p for p in found if is_image_file(p) and p.is_file())


def _in_hidden_dir(root: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in root.relative_to(top).parts)
