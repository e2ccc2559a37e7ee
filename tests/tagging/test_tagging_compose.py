"""Thresholds per category, ordering, rating, undesired tags, trigger word, existing captions."""

from __future__ import annotations

import numpy as np
import pytest

from loraforge.tagging import (
    ScoredTags,
    TagLabels,
    compose_caption,
    finish_tags,
    order_tags,
    select_tags,
)

LABELS = TagLabels(
    names=("general", "sensitive", "explicit", "1girl", "long_hair", "smile", "^_^", "miku", "rin"),
    categories=(9, 9, 9, 0, 0, 0, 0, 4, 4),
)
PROBS = np.array([0.2, 0.7, 0.1, 0.95, 0.6, 0.34, 0.5, 0.8, 0.4])


def test_thresholds_are_per_category_and_inclusive() -> None:
    scored = select_tags(PROBS, LABELS, general_threshold=0.5, character_threshold=0.8)
    assert [t for t, _ in scored.general] == ["1girl", "long_hair", "^_^"]  # 0.5 >= 0.5
    assert [t for t, _ in scored.character] == ["miku"]
    assert scored.rating == ("sensitive", pytest.approx(0.7))
    low = select_tags(PROBS, LABELS, general_threshold=0.3, character_threshold=0.35)
    assert [t for t, _ in low.general] == ["1girl", "long_hair", "smile", "^_^"]
    assert [t for t, _ in low.character] == ["miku", "rin"]


def test_float32_scores_compare_in_float32() -> None:
    """A float32 score equal to the threshold's float32 value passes (as in sd-scripts)."""
    labels = TagLabels(names=("a", "b"), categories=(0, 4))
    scored = select_tags(np.array([0.35, 0.35], np.float32), labels, 0.35, 0.35)
    assert [t for t, _ in scored.general] == ["a"] and [t for t, _ in scored.character] == ["b"]


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="9 labels"):
        select_tags(np.zeros(3), LABELS, 0.3, 0.3)


def test_no_rating_category_gives_no_rating() -> None:
    labels = TagLabels(names=("a", "b"), categories=(0, 0))
    assert select_tags(np.array([0.9, 0.1]), labels, 0.5, 0.5).rating is None


def scored_default() -> ScoredTags:
    return select_tags(PROBS, LABELS, general_threshold=0.35, character_threshold=0.35)


def test_default_order_confidence_then_characters(tagging_config) -> None:
    cfg = tagging_config()
    assert order_tags(scored_default(), cfg) == ["1girl", "long hair", "^_^", "miku", "rin"]


def test_character_first_alphabetical_and_rating(tagging_config) -> None:
    cfg = tagging_config(character_tags_first=True, sort_tags="alphabetical", include_rating=True)
    assert order_tags(scored_default(), cfg) == [
        "sensitive",
        "miku",
        "rin",
        "1girl",
        "^_^",
        "long hair",
    ]


def test_underscores_kept_when_asked(tagging_config) -> None:
    cfg = tagging_config(replace_underscores=False)
    assert "long_hair" in order_tags(scored_default(), cfg)


def test_finish_applies_replace_undesired_front_and_trigger(tagging_config) -> None:
    cfg = tagging_config(
        replace_tags={"long hair": "very long hair", "^_^": "smile"},
        undesired_tags=("very_long_hair", "miku"),
        always_first_tags=("rin", "1boy"),
        trigger_word="sks girl",
    )
    tags = ["1girl", "long hair", "^_^", "smile", "miku", "rin", "sks girl"]
    assert finish_tags(tags, cfg) == ["sks girl", "rin", "1girl", "smile"]


def test_undesired_tags_never_remove_the_trigger_word(tagging_config) -> None:
    cfg = tagging_config(undesired_tags=("sks",), trigger_word="sks")
    assert finish_tags(["a", "sks"], cfg) == ["sks", "a"]


def test_compose_overwrite_and_append(tagging_config) -> None:
    cfg = tagging_config(trigger_word="sks", undesired_tags=("blue hair",))
    new = ["1girl", "blue hair", "smile"]
    assert compose_caption(new, "old, tags", cfg, append=False) == "sks, 1girl, smile"
    appended = compose_caption(new, "solo, smile, blue_hair", cfg, append=True)
    assert appended == "sks, solo, smile, 1girl"
    assert compose_caption(new, None, cfg, append=True) == "sks, 1girl, smile"
    assert compose_caption(new, "a|b", cfg, append=True, separator="|") == "sks| a| b| 1girl| smile"


def test_captioner_mode_keeps_sentences_whole(tagging_config) -> None:
    cfg = tagging_config(mode="captioner", trigger_word="sks", undesired_tags=("a cat",))
    assert compose_caption(["a cat on a table"], None, cfg, append=False) == "sks, a cat on a table"
    assert (
        compose_caption(["a cat on a table"], "my caption", cfg, append=True)
        == "sks, my caption, a cat on a table"
    )
