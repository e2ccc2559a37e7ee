"""Pure tag clean-up helpers and the tag frequency report."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from loraforge.tagging import (
    dedupe_tags,
    display_name,
    join_caption,
    merge_frequencies,
    merge_tags,
    move_to_front,
    prepend_tags,
    read_frequency_report,
    remove_tags,
    replace_tags,
    replace_words,
    sort_scored,
    split_caption,
    tag_frequency,
    tag_frequency_by_folder,
    write_frequency_report,
)

TAG_TEXT = st.text(
    alphabet=st.characters(blacklist_characters=",\n\r", blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip())


def test_split_and_join() -> None:
    assert split_caption(" a,b ,, c\n d ") == ["a", "b", "c", "d"]
    assert split_caption("a|b", "|") == ["a", "b"]
    assert join_caption(["a", "b c"]) == "a, b c"
    assert join_caption(["a", "b"], "|") == "a| b"


@given(st.lists(TAG_TEXT, max_size=8))
def test_split_join_round_trip(tags: list[str]) -> None:
    stripped = [t.strip() for t in tags]
    assert split_caption(join_caption(stripped)) == stripped


@given(st.lists(st.sampled_from(["a", "A", "b_c", "b c", "d", "D "]), max_size=10))
def test_dedupe_keeps_first_and_is_idempotent(tags: list[str]) -> None:
    once = dedupe_tags(tags)
    assert dedupe_tags(once) == once
    keys = [t.strip().lower().replace("_", " ") for t in once]
    assert len(keys) == len(set(keys))
    for tag in once:  # every kept tag is the first of its kind
        first = next(
            t
            for t in tags
            if t.strip().lower().replace("_", " ") == tag.strip().lower().replace("_", " ")
        )
        assert tag == first


def test_remove_matches_case_and_underscores() -> None:
    tags = ["blue hair", "Long_Hair", "smile"]
    assert remove_tags(tags, ["BLUE_HAIR", "long hair"]) == ["smile"]


def test_replace_whole_tags_and_empty_target_removes() -> None:
    tags = ["1girl", "blue hair", "red_eyes", "blue haired"]
    result = replace_tags(tags, {"blue_hair": "aqua hair", "red eyes": ""})
    assert result == ["1girl", "aqua hair", "blue haired"]


def test_replace_words_in_sentences() -> None:
    text = "a woman standing near a womanly statue, A Woman smiles"
    assert (
        replace_words(text, {"a woman": "1girl"})
        == "1girl standing near a womanly statue, 1girl smiles"
    )
    assert replace_words("a cat on a mat", {"cat": "dog", "a cat": "one cat"}) == "one cat on a mat"


def test_sort_by_confidence_and_alphabetical() -> None:
    scored = [("b", 0.5), ("a", 0.9), ("c", 0.5), ("D", 0.7)]
    assert sort_scored(scored, "confidence") == ["a", "D", "b", "c"]
    assert sort_scored(scored, "alphabetical") == ["a", "b", "c", "D"]


def test_move_to_front_keeps_listed_order_and_adds_nothing() -> None:
    tags = ["smile", "solo", "1girl", "blue hair"]
    assert move_to_front(tags, ["1girl", "1boy", "solo"]) == ["1girl", "solo", "smile", "blue hair"]
    assert move_to_front(tags, []) == tags


def test_prepend_and_merge() -> None:
    assert prepend_tags(["a", "sks", "b"], ["sks"]) == ["sks", "a", "b"]
    assert merge_tags(["x", "a"], ["a", "b"]) == ["x", "a", "b"]


def test_display_name_keeps_kaomoji_underscores() -> None:
    assert display_name("long_hair") == "long hair"
    assert display_name("^_^") == "^_^"
    assert display_name("o_o") == "o_o"
    assert display_name("long_hair", replace_underscores=False) == "long_hair"


def test_tag_frequency_counts_like_ss_tag_frequency() -> None:
    captions = ["1girl, Blue Hair, smile", "1girl,blue hair", "", " , solo ,"]
    expected = {"1girl": 2, "blue hair": 2, "smile": 1, "solo": 1}
    got = tag_frequency(captions)
    assert got == expected
    assert list(got) == ["1girl", "blue hair", "smile", "solo"]  # most frequent, then by tag


def test_frequency_by_folder_and_merge() -> None:
    report = tag_frequency_by_folder({"10_char": ["a, b", "a"], "5_style": ["c"]})
    assert report == {"10_char": {"a": 2, "b": 1}, "5_style": {"c": 1}}
    merged = merge_frequencies(report, {"10_char": {"b": 3}})
    assert merged == {"10_char": {"b": 4, "a": 2}, "5_style": {"c": 1}}


def test_frequency_report_round_trip(tmp_path) -> None:
    report = {"10_char": {"blue hair": 3, "ü": 1}}
    path = tmp_path / "out" / "tag_frequency.json"
    write_frequency_report(path, report)
    assert json.loads(path.read_text(encoding="utf-8")) == report
    assert read_frequency_report(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["tag_frequency.json"]  # no temp files
