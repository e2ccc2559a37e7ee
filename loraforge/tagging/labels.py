"""The label file of a WD14-family tagger (``selected_tags.csv``) and how tag names are written.

SmilingWolf's taggers ship ``model.onnx`` next to ``selected_tags.csv`` whose header is
``tag_id,name,category,count``; row ``i`` names output ``i`` of the model. Categories: 9 rating,
0 general, 4 character (others, e.g. 1 artist or 3 copyright in some community taggers, are
ignored the way the reference implementations ignore them).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from loraforge.errors import ModelError

RATING = 9
GENERAL = 0
CHARACTER = 4

# Emoticon tags whose underscores are part of the face, not word separators. The list is the
# one the WD14 tagger demo (SmilingWolf's Hugging Face space) and the A1111 tagger keep as is.
KAOMOJIS: frozenset[str] = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)

_REQUIRED_COLUMNS = ("tag_id", "name", "category")


@dataclass(frozen=True)
class TagLabels:
    """The tagger's vocabulary in output order.

    Attributes:
        names: raw tag names as in the CSV (``long_hair``), index = model output index.
        categories: the category of each tag (9 rating, 0 general, 4 character).
    """

    names: tuple[str, ...]
    categories: tuple[int, ...]

    def indexes(self, category: int) -> np.ndarray:
        """Output indexes (``int64`` array) of the tags in ``category``, in CSV order."""
        return np.flatnonzero(self._category_array == category)

    @cached_property
    def _category_array(self) -> np.ndarray:
        # Computed once per tagger: selecting tags runs per image over ~10k labels.
        return np.asarray(self.categories, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)


def read_selected_tags(path: Path) -> TagLabels:
    """Read a ``selected_tags.csv`` label file.

    Args:
        path: the CSV file; its header must start with ``tag_id,name,category``.

    Raises:
        ModelError: the file is missing, has another header, or a category is not an integer.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ModelError(
            f"{path}: cannot read the tagger's label file ({e.strerror or e})",
            hint="a WD14 tagger folder holds model.onnx and selected_tags.csv",
        ) from e
    if not rows or tuple(c.strip() for c in rows[0][:3]) != _REQUIRED_COLUMNS:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise ModelError(
            f"{path}: expected the header tag_id,name,category,count, found {found!r}",
            hint="use the selected_tags.csv that ships with the tagger model",
        )
    names: list[str] = []
    categories: list[int] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            categories.append(int(row[2]))
        except (IndexError, ValueError) as e:
            raise ModelError(
                f"{path}:{line_no}: the category column is not an integer: {row!r}",
                hint="use the selected_tags.csv that ships with the tagger model",
            ) from e
        names.append(row[1])
    return TagLabels(names=tuple(names), categories=tuple(categories))


def display_name(tag: str, replace_underscores: bool = True) -> str:
    """The tag as written into a caption.

    Args:
        tag: the raw tag name (``long_hair``).
        replace_underscores: write ``long hair``; emoticons in :data:`KAOMOJIS` keep theirs.
    """
    if not replace_underscores or tag in KAOMOJIS:
        return tag
    return tag.replace("_", " ")
