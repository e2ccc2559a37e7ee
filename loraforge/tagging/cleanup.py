"""Tag clean-up: pure functions on lists of tags, driven by the recipe's ``tagging`` section.

Tags are compared by a normalised key (case-insensitive, ``_`` and runs of spaces equal), so
``Long_Hair`` in a recipe matches the ``long hair`` a tagger writes. The written form of a tag
is never changed except by an explicit replacement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

_SPACES = re.compile(r"\s+")


@lru_cache(maxsize=65536)  # a tagger's vocabulary is ~10k tags, each compared many times
def tag_key(tag: str) -> str:
    """The form tags are compared in: lower case, underscores as spaces, single spaces, stripped."""
    return _SPACES.sub(" ", tag.replace("_", " ")).strip().lower()


def split_caption(text: str, separator: str = ",") -> list[str]:
    """Split a caption into tags: split on ``separator``, strip each, drop empty ones.

    Args:
        text: the caption (newlines count as separators too).
        separator: the subset's ``caption_separator`` (default ``,``).
    """
    sep = separator.strip() or separator
    pieces = text.replace("\r", "\n").replace("\n", sep).split(sep)
    return [p.strip() for p in pieces if p.strip()]


def join_caption(tags: Iterable[str], separator: str = ",") -> str:
    """Join tags with ``separator`` followed by a space (``a, b``), the way taggers write them."""
    sep = separator.strip()
    return (f"{sep} " if sep else separator).join(tags)


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    """Drop repeated tags (by :func:`tag_key`), keeping the first occurrence and the order."""
    seen: set[str] = set()
    kept: list[str] = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


def remove_tags(tags: Iterable[str], undesired: Iterable[str]) -> list[str]:
    """Drop every tag that matches one of ``undesired`` (by :func:`tag_key`)."""
    banned = {tag_key(t) for t in undesired}
    return [t for t in tags if tag_key(t) not in banned]


def replace_tags(tags: Iterable[str], replacements: Mapping[str, str]) -> list[str]:
    """Replace whole tags: ``{"from": "to"}``; an empty ``to`` removes the tag.

    Matching is by :func:`tag_key`; the replacement is written exactly as given. The result may
    hold duplicates (two sources mapped to one target): call :func:`dedupe_tags` after.
    """
    table = {tag_key(src): dst.strip() for src, dst in replacements.items()}
    result: list[str] = []
    for tag in tags:
        new = table.get(tag_key(tag), tag)
        if new:
            result.append(new)
    return result


def replace_words(text: str, replacements: Mapping[str, str]) -> str:
    """Replace whole words or phrases in free text (captioner output), case-insensitively.

    ``{"a woman": "1girl"}`` turns ``a woman standing`` into ``1girl standing`` but leaves
    ``a womanly look`` alone. One pass: a replacement's output is not replaced again, and
    longer phrases win over their parts.
    """
    table = {src.strip().lower(): dst for src, dst in replacements.items() if src.strip()}
    if not table:
        return text
    alternatives = "|".join(re.escape(src) for src in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    replaced = pattern.sub(lambda m: table[m.group(0).lower()], text)
    return _SPACES.sub(" ", replaced).strip()


def sort_scored(scored: Sequence[tuple[str, float]], order: str) -> list[str]:
    """Order ``(tag, confidence)`` pairs and return the tags.

    Args:
        scored: tags with their confidence.
        order: ``"confidence"`` (highest first; ties alphabetical, so output is stable) or
            ``"alphabetical"`` (by :func:`tag_key`).

    Raises:
        ValueError: an unknown order (the recipe schema only allows these two).
    """
    if order == "confidence":
        ranked = sorted(scored, key=lambda ts: (-ts[1], tag_key(ts[0])))
    elif order == "alphabetical":
        ranked = sorted(scored, key=lambda ts: tag_key(ts[0]))
    else:
        raise ValueError(f"unknown tag order {order!r}")
    return [tag for tag, _ in ranked]


def move_to_front(tags: Sequence[str], first: Sequence[str]) -> list[str]:
    """Move the tags in ``first`` that are present to the front, in ``first``'s order.

    Unlike sd-scripts' ``--always_first_tags`` (which leaves the last-listed tag first), the
    listed order is kept: ``first=("1girl", "solo")`` gives ``1girl, solo, …``.
    Tags in ``first`` that are not present are not added.
    """
    present = {tag_key(t): t for t in tags}
    front = [present[tag_key(f)] for f in first if tag_key(f) in present]
    front = dedupe_tags(front)
    front_keys = {tag_key(t) for t in front}
    return front + [t for t in tags if tag_key(t) not in front_keys]


def prepend_tags(tags: Sequence[str], prefix: Sequence[str]) -> list[str]:
    """Put ``prefix`` first (always, e.g. a trigger word), removing its later duplicates."""
    return dedupe_tags([*prefix, *tags])


def merge_tags(existing: Sequence[str], new: Sequence[str]) -> list[str]:
    """Existing tags first, then the new ones not already there (append mode)."""
    return dedupe_tags([*existing, *new])
