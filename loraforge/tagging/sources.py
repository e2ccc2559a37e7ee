"""Which folders a tagging run covers: the recipe's subsets, or one folder from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.data.subsets import resolve_subsets
from loraforge.errors import DatasetError
from loraforge.tagging.runner import TagFolder

if TYPE_CHECKING:
    from loraforge.recipe.types import DatasetConfig


@dataclass(frozen=True)
class FolderSelection:
    """The folders to tag and what is worth telling the user about the choice."""

    folders: tuple[TagFolder, ...]
    notes: tuple[str, ...]


def folders_from_dataset(
    dataset: DatasetConfig, caption_extension: str, include_reg: bool = False
) -> FolderSelection:
    """The recipe's image folders (kohya ``<repeats>_<name>`` children expanded).

    Regularization subsets are left out unless ``include_reg``: their images are captioned by
    their class tokens in DreamBooth-style training, and tags would change that.

    Args:
        dataset: the recipe's dataset section.
        caption_extension: the extension tagging writes; a subset that reads another one gets
            a note (training would not see the new captions).
        include_reg: also tag regularization subsets.

    Raises:
        DatasetError: a subset folder does not exist.
    """
    resolution = resolve_subsets(dataset)
    # the folders' own findings (resolution.warnings) are the recipe's, printed with them
    notes: list[str] = []
    folders: list[TagFolder] = []
    seen: set[Path] = set()
    for subset in resolution.subsets:
        if subset.dir in seen:
            continue
        seen.add(subset.dir)
        if subset.is_reg and not include_reg:
            notes.append(f"{subset.dir}: regularization images are not tagged (--include-reg)")
            continue
        if _ext(subset.config.caption_extension) != _ext(caption_extension):
            notes.append(
                f"{subset.dir}: training reads {subset.config.caption_extension} captions "
                f"but tagging writes {caption_extension} (tagging.caption_extension)"
            )
        folders.append(
            TagFolder(
                path=subset.dir,
                name=subset.dir.name,
                separator=subset.config.caption_separator or ",",
            )
        )
    return FolderSelection(tuple(folders), tuple(notes))


def folder_from_path(
    folder: Path, recursive: bool = False, separator: str = ","
) -> FolderSelection:
    """One folder given on the command line.

    Raises:
        DatasetError: ``folder`` is not a directory.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: not a folder", hint="pass --dir a folder that holds the images to tag"
        )
    return FolderSelection((TagFolder(folder, folder.name, separator, recursive),), ())


def _ext(extension: str) -> str:
    return extension.lower() if extension.startswith(".") else "." + extension.lower()
