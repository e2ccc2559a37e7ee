"""From model output to the caption line: thresholds, order, clean-up, existing captions.

Pure functions: the tagger's probabilities (or the captioner's sentence) and the recipe's
``tagging`` section in, a list of tags or a caption line out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loraforge.tagging.cleanup import (
    dedupe_tags,
    join_caption,
    merge_tags,
    move_to_front,
    prepend_tags,
    remove_tags,
    replace_tags,
    sort_scored,
    split_caption,
)
from loraforge.tagging.labels import CHARACTER, GENERAL, RATING, TagLabels, display_name

if TYPE_CHECKING:
    from loraforge.recipe.types import TaggingConfig


@dataclass(frozen=True)
class ScoredTags:
    """The tags one image passed the thresholds with, by category, raw names and confidences.

    Attributes:
        rating: the most likely rating tag (argmax over the rating category), ``None`` when the
            model has no rating outputs.
        general: general tags at or above the general threshold, in label order.
        character: character tags at or above the character threshold, in label order.
    """

    rating: tuple[str, float] | None
    general: tuple[tuple[str, float], ...]
    character: tuple[tuple[str, float], ...]


def select_tags(
    probs: np.ndarray, labels: TagLabels, general_threshold: float, character_threshold: float
) -> ScoredTags:
    """Apply the per-category thresholds to one image's probabilities.

    A tag is kept when its confidence is ``>=`` its category's threshold (as sd-scripts does).

    Args:
        probs: shape ``(num_tags,)``, the model's sigmoid outputs for one image.
        labels: the model's vocabulary (same length as ``probs``).
        general_threshold: minimum confidence of general (category 0) tags.
        character_threshold: minimum confidence of character (category 4) tags.

    Raises:
        ValueError: ``probs`` and ``labels`` differ in length.
    """
    probs = np.asarray(probs).reshape(-1)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if probs.shape[0] != len(labels):
        raise ValueError(f"the model gives {probs.shape[0]} scores but has {len(labels)} labels")

    def passing(category: int, threshold: float) -> tuple[tuple[str, float], ...]:
        idx = labels.indexes(category)
        # Compared in the model's precision: a float32 score of 0.35 passes a 0.35 threshold.
        kept = idx[probs[idx] >= probs.dtype.type(threshold)]
        return tuple((labels.names[i], float(probs[i])) for i in kept)

    rating_idx = labels.indexes(RATING)
    rating = None
    if rating_idx.size:
        best = int(rating_idx[np.argmax(probs[rating_idx])])
        rating = (labels.names[best], float(probs[best]))
    return ScoredTags(
        rating=rating,
        general=passing(GENERAL, general_threshold),
        character=passing(CHARACTER, character_threshold),
    )


def order_tags(scored: ScoredTags, config: TaggingConfig) -> list[str]:
    """The written tags of one image in order, before clean-up.

    General and character tags are each ordered by ``sort_tags``; character tags come first when
    ``character_tags_first``, else after the general ones; the rating (``include_rating``) leads.
    """

    def named(pairs: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
        return [(display_name(t, config.replace_underscores), p) for t, p in pairs]

    general = sort_scored(named(scored.general), config.sort_tags)
    character = sort_scored(named(scored.character), config.sort_tags)
    ordered = character + general if config.character_tags_first else general + character
    if config.include_rating and scored.rating is not None:
        ordered.insert(0, display_name(scored.rating[0], config.replace_underscores))
    return ordered


def finish_tags(tags: Sequence[str], config: TaggingConfig) -> list[str]:
    """Recipe clean-up on a tag list, in this order: replace, remove undesired, dedupe,
    move ``always_first_tags`` to the front, put the trigger word first.

    Replacing before removing lets ``undesired_tags`` also catch a replacement's result; the
    trigger word goes last so that no undesired tag or replacement can remove it.
    In captioner mode only dedupe and the trigger word apply (sentences are not tags).
    """
    result = list(tags)
    if config.mode == "tagger":
        result = replace_tags(result, config.replace_tags)
        result = remove_tags(result, config.undesired_tags)
        result = move_to_front(dedupe_tags(result), config.always_first_tags)
    if config.trigger_word and config.trigger_word.strip():
        result = prepend_tags(result, [config.trigger_word.strip()])
    return dedupe_tags(result)


def compose_caption(
    new_items: Sequence[str],
    existing: str | None,
    config: TaggingConfig,
    *,
    append: bool,
    separator: str = ",",
) -> str:
    """The caption line to write for one image.

    Args:
        new_items: tags from :func:`order_tags`, or ``[sentence]`` from a captioner.
        existing: the current caption text, ``None`` when the image has none.
        config: the recipe's tagging section.
        append: keep the existing tags first and add the new ones not already there
            (sd-scripts' ``--append_tags``); false: the new caption replaces the old one.
        separator: the subset's ``caption_separator``; tags are joined as ``"<sep> "``.
    """
    items: list[str] = list(new_items)
    if append and existing is not None and existing.strip():
        items = merge_tags(split_caption(existing, separator), items)
    return join_caption(finish_tags(items, config), separator)
