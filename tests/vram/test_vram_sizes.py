"""parse_size / format_bytes: the sizes people type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraforge.errors import LoraforgeError
from loraforge.vram import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GB", 12 * 1024**3),
        ("12 GB", 12 * 1024**3),
        ("12gib", 12 * 1024**3),
        ("11.5G", int(11.5 * 1024**3)),
        ("8000MB", 8000 * 1024**2),
        ("512 MiB", 512 * 1024**2),
        ("1TB", 1024**4),
        ("4096", 4096),
        ("100 B", 100),
        (".5GB", 512 * 1024**2),
        (2048, 2048),
    ],
)
def test_parse_size_accepts_common_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12 parsecs", "-3GB", "1.2.3GB", "twelve"])
def test_parse_size_rejects_non_sizes_with_a_hint(text):
    with pytest.raises(LoraforgeError) as info:
        parse_size(text)
    assert info.value.hint and "12GB" in info.value.hint


@given(st.integers(min_value=1, max_value=4096))
def test_whole_gib_round_trip_through_format(gib):
    assert parse_size(format_bytes(gib * 1024**3)) == gib * 1024**3


def test_format_bytes_units():
    assert format_bytes(12) == "12 B"
    assert format_bytes(3 * 1024) == "3.0 KiB"
    assert format_bytes(1536 * 1024**2) == "1.50 GiB"
    assert format_bytes(-2 * 1024**2) == "-2.0 MiB"


def test_header_budget_reads_the_vram_comment(tmp_path):
    from loraforge.presets import get_preset
    from loraforge.vram import header_budget

    assert header_budget(get_preset("char-8gb").path) == 8 * 1024**3
    plain = tmp_path / "recipe.yaml"
    plain.write_text("# my recipe\nmodel:\n  base: x\n# vram: 4 GB (not a header any more)\n")
    assert header_budget(plain) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("# vram: lots\n")
    with pytest.raises(LoraforgeError):
        header_budget(bad)
