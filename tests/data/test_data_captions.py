"""Training-time captions: sd-scripts semantics, reproducibility, and properties."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraforge.data.captions import CaptionOptions, expand_wildcards, process_caption


def run(caption: str, epoch: int = 1, seed: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), random.Random(seed), epoch)


def test_defaults_leave_a_one_line_caption_alone() -> None:
    assert run("sks frog,  green , sitting") == "sks frog,  green , sitting"


def test_prefix_and_suffix() -> None:
    assert run("a, b", caption_prefix="sks", caption_suffix="photo") == "sks a, b photo"


def test_multi_line_without_wildcards_uses_the_first_line() -> None:
    assert run("one, two\nthree", caption_suffix="end") == "one, two end"


def test_multi_line_with_wildcards_draws_a_line_and_keeps_prefix_and_suffix() -> None:
    ends = {"caption_prefix": "P", "caption_suffix": "S"}
    seen = {run("alpha\nbeta\ngamma", seed=s, enable_wildcard=True, **ends) for s in range(200)}
    assert seen == {"P alpha S", "P beta S", "P gamma S"}


def test_wildcards_and_escaped_braces() -> None:
    seen = {run("a {red|blue} {{x}} hat", seed=s, enable_wildcard=True) for s in range(200)}
    assert seen == {"a red {x} hat", "a blue {x} hat"}
    # Without enable_wildcard the braces are text.
    assert run("a {red|blue} hat") == "a {red|blue} hat"


def test_expand_wildcards_keeps_existing_marker_characters() -> None:
    assert expand_wildcards("⦅ {{a}} {b} ⦆", random.Random(0)) == "⦅ {a} b ⦆"


def test_shuffle_keeps_the_first_keep_tokens() -> None:
    caption = "sks, 1girl, red hair, smile, outdoors, hat"
    results = {run(caption, seed=s, shuffle_caption=True, keep_tokens=2) for s in range(50)}
    assert len(results) > 10
    for text in results:
        tokens = text.split(", ")
        assert tokens[:2] == ["sks", "1girl"]
        assert sorted(tokens[2:]) == sorted(["red hair", "smile", "outdoors", "hat"])


def test_keep_tokens_separator_fixes_head_and_tail() -> None:
    caption = "sks, woman ||| red hair, smile, hat ||| best quality, masterpiece"
    for seed in range(30):
        text = run(caption, seed=seed, shuffle_caption=True, keep_tokens_separator="|||")
        tokens = text.split(", ")
        assert tokens[:2] == ["sks", "woman"]
        assert tokens[-2:] == ["best quality", "masterpiece"]
        assert sorted(tokens[2:-2]) == ["hat", "red hair", "smile"]


def test_keep_tokens_separator_never_reaches_the_text_encoder() -> None:
    # sd-scripts leaves "|||" in when shuffle and tag dropout are off; loraforge always splits.
    assert run("sks ||| a, b", keep_tokens_separator="|||") == "sks, a, b"
    assert run("sks, a, b", keep_tokens_separator="|||") == "sks, a, b"


def test_secondary_separator_joins_after_shuffle() -> None:
    caption = "sks, red;;;dress, hat"
    results = {
        run(caption, seed=s, shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
        for s in range(40)
    }
    assert results == {"sks, red,dress, hat", "sks, hat, red,dress"}


def test_custom_separator() -> None:
    text = run("sks. a. b. c", seed=3, shuffle_caption=True, keep_tokens=1, caption_separator=".")
    assert text.startswith("sks, ")
    assert sorted(text.split(", ")[1:]) == ["a", "b", "c"]


def test_dropout_rate_and_every_n_epochs() -> None:
    assert run("a, b", caption_dropout_rate=1.0) == ""
    empties = sum(run("a, b", seed=s, caption_dropout_rate=0.3) == "" for s in range(2000))
    assert 500 < empties < 700
    # Epochs are 1-based: every 3rd epoch is 3, 6, ...
    got = [run("a, b", epoch=e, caption_dropout_every_n_epochs=3) for e in range(1, 7)]
    assert got == ["a, b", "a, b", "", "a, b", "a, b", ""]


def test_tag_dropout_spares_kept_tokens() -> None:
    assert run("sks, a, b, c", keep_tokens=1, caption_tag_dropout_rate=1.0) == "sks"
    kept = Counter()
    for seed in range(1000):
        kept.update(
            run("sks, a, b", seed=seed, keep_tokens=1, caption_tag_dropout_rate=0.25).split(", ")
        )
    assert kept["sks"] == 1000
    assert 680 < kept["a"] < 820 and 680 < kept["b"] < 820


def test_same_seed_same_caption() -> None:
    options = dict(
        shuffle_caption=True,
        keep_tokens=1,
        caption_tag_dropout_rate=0.2,
        caption_dropout_rate=0.1,
        enable_wildcard=True,
    )
    caption = "sks, {a|b|c}, d, e, f, g\nsks, other, line"
    for seed in range(20):
        assert run(caption, seed=seed, **options) == run(caption, seed=seed, **options)


def test_options_from_subset(subset_config) -> None:
    subset = subset_config("/x", shuffle_caption=True, keep_tokens=2, caption_prefix="p")
    options = CaptionOptions.from_subset(subset)
    assert (options.shuffle_caption, options.keep_tokens, options.caption_prefix) == (True, 2, "p")
    assert options.is_random and not CaptionOptions().is_random


tag = st.text(alphabet="abcdefghij xyz_", min_size=1, max_size=8).map(str.strip).filter(bool)


@given(tags=st.lists(tag, min_size=1, max_size=12), keep=st.integers(0, 4), seed=st.integers())
def test_shuffle_is_a_permutation_with_fixed_head(tags, keep, seed) -> None:
    caption = ", ".join(tags)
    out = run(caption, seed=seed, shuffle_caption=True, keep_tokens=keep).split(", ")
    assert out[:keep] == tags[:keep]
    assert Counter(out) == Counter(tags)


@given(
    tags=st.lists(tag, min_size=1, max_size=12),
    keep=st.integers(0, 4),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(),
)
def test_tag_dropout_without_shuffle_is_an_ordered_subsequence(tags, keep, rate, seed) -> None:
    out = run(", ".join(tags), seed=seed, keep_tokens=keep, caption_tag_dropout_rate=rate)
    tokens = out.split(", ") if out else []
    assert tokens[:keep] == tags[:keep]
    remaining = iter(tags[keep:])
    assert all(any(t == r for r in remaining) for t in tokens[keep:])


@given(caption=st.text(max_size=60), seed=st.integers())
def test_any_text_is_processed_without_error(caption, seed) -> None:
    options = dict(
        shuffle_caption=True,
        keep_tokens=1,
        keep_tokens_separator="|||",
        secondary_separator=";;;",
        enable_wildcard=True,
        caption_tag_dropout_rate=0.3,
    )
    result = run(caption, seed=seed, **options)
    assert isinstance(result, str)
    assert result == run(caption, seed=seed, **options)
    if "|||" in caption and caption.count("|||") <= 2 and "{" not in caption:
        assert "|||" not in result


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_no_draws_without_random_options(epoch) -> None:
    rng = random.Random(5)
    state = rng.getstate()
    process_caption("a, b\nc", CaptionOptions(keep_tokens=1), rng, epoch)
    assert rng.getstate() == state
