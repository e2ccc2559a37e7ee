"""Discovery: kohya folders, captions and encodings, bad files, reg balance, empty datasets."""

from __future__ import annotations

import codecs
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraforge.data.discovery import ImageRecord, balance_reg_repeats, discover
from loraforge.data.subsets import parse_folder_name, resolve_subsets
from loraforge.errors import DatasetError


@pytest.mark.parametrize(
    ("name", "repeats", "tokens"),
    [
        ("20_sls frog", 20, "sls frog"),
        ("10_my_char woman", 10, "my_char woman"),
        ("3_", 3, None),
        ("0_zero", 0, "zero"),
        ("007_bond", 7, "bond"),
    ],
)
def test_parse_folder_name(name: str, repeats: int, tokens: str | None) -> None:
    parsed = parse_folder_name(name)
    assert parsed is not None
    assert (parsed.repeats, parsed.class_tokens) == (repeats, tokens)


@pytest.mark.parametrize("name", ["images", "frog_20", "x20_frog", "", "_5"])
def test_non_kohya_names(name: str) -> None:
    assert parse_folder_name(name) is None


def _kohya_tree(root: Path, write_image) -> Path:
    train = root / "train"
    write_image(train / "20_sls frog" / "b.png", (64, 48))
    write_image(train / "20_sls frog" / "a.jpg", (48, 64))
    (train / "20_sls frog" / "a.txt").write_text("sls frog, sitting\n", encoding="utf-8")
    write_image(train / "5_sls frog closeup" / "c.webp", (32, 32))
    write_image(train / "misc" / "d.png", (32, 32))  # no '<N>_': ignored like sd-scripts
    write_image(train / "0_zero" / "e.png", (32, 32))  # 0 repeats: ignored
    (train / "notes.txt").write_text("not an image")
    return train


def test_parent_folder_expands_to_kohya_subsets(
    tmp_path, write_image, subset_config, dataset_config
):
    train = _kohya_tree(tmp_path, write_image)
    found = discover(dataset_config(subset_config(train)))

    assert [(s.dir.name, s.repeats, s.class_tokens) for s in found.subsets] == [
        ("20_sls frog", 20, "sls frog"),
        ("5_sls frog closeup", 5, "sls frog closeup"),
    ]
    got = [
        (i.path.name, i.size, i.subset, i.caption, i.caption_source, i.repeats)
        for i in found.images
    ]
    assert got == [
        ("a.jpg", (48, 64), 0, "sls frog, sitting", "file", 20),
        ("b.png", (64, 48), 0, "sls frog", "class_tokens", 20),
        ("c.webp", (32, 32), 1, "sls frog closeup", "class_tokens", 5),
    ]
    assert found.num_train_images == 2 * 20 + 5
    assert found.num_samples == 45
    text = "\n".join(found.warnings)
    assert "misc" in text and "0 repeats" in text
    assert found.searched == (train,)


def test_recipe_values_win_over_folder_name(tmp_path, write_image, subset_config, dataset_config):
    folder = write_image(tmp_path / "12_cat animal" / "x.png", (16, 16)).parent
    found = discover(dataset_config(subset_config(folder)))
    assert (found.images[0].repeats, found.images[0].caption) == (12, "cat animal")
    found = discover(dataset_config(subset_config(folder, repeats=3, class_tokens="kitty")))
    assert (found.images[0].repeats, found.images[0].caption) == (3, "kitty")


def test_plain_folder_without_captions_uses_empty_caption_and_warns(
    tmp_path, write_image, subset_config, dataset_config
):
    folder = write_image(tmp_path / "images" / "x.png", (16, 16)).parent
    found = discover(dataset_config(subset_config(folder)))
    image = found.images[0]
    assert (image.repeats, image.caption, image.caption_source) == (1, "", "none")
    assert any("empty caption" in w for w in found.warnings)


def test_caption_encodings_and_lines(tmp_path, write_image, subset_config, dataset_config):
    folder = tmp_path / "4_thing"
    for name in ("bom", "utf16", "latin", "multi", "blank", "crlf"):
        write_image(folder / f"{name}.png", (16, 16))
    (folder / "bom.txt").write_bytes(codecs.BOM_UTF8 + "café, frog".encode())
    (folder / "utf16.txt").write_bytes("日本, frog".encode("utf-16"))
    (folder / "latin.txt").write_bytes("caf\xe9, frog".encode("latin-1"))
    (folder / "multi.txt").write_text("first line\n\n  second line  \n", encoding="utf-8")
    (folder / "blank.txt").write_text("", encoding="utf-8")
    (folder / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")

    found = discover(dataset_config(subset_config(folder)))
    captions = {i.path.stem: (i.caption, i.caption_source) for i in found.images}
    assert captions == {
        "blank": ("thing", "class_tokens"),
        "bom": ("café, frog", "file"),
        "crlf": ("one", "file"),
        "latin": ("thing", "class_tokens"),
        "multi": ("first line", "file"),
        "utf16": ("日本, frog", "file"),
    }
    issues = {i.path.name: i.reason for i in found.caption_issues}
    assert set(issues) == {"latin.txt", "blank.txt"}
    assert "not UTF-8" in issues["latin.txt"] and "0xe9" in issues["latin.txt"]

    wild = discover(dataset_config(subset_config(folder, enable_wildcard=True)))
    captions = {i.path.stem: i.caption for i in wild.images}
    assert captions["multi"] == "first line\nsecond line"
    assert captions["crlf"] == "one\ntwo"


def test_caption_extension_with_or_without_dot(
    tmp_path, write_image, subset_config, dataset_config
):
    folder = write_image(tmp_path / "1_x" / "a.png", (16, 16)).parent
    (folder / "a.caption").write_text("from caption file")
    for ext in (".caption", "caption"):
        found = discover(dataset_config(subset_config(folder, caption_extension=ext)))
        assert found.images[0].caption == "from caption file"


def test_bad_files_are_skipped_with_reasons(
    tmp_path, write_image, noisy_image, truncate, huge_png, subset_config, dataset_config
):
    folder = tmp_path / "2_mixed"
    write_image(folder / "good.png", (40, 20))
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    truncate(noisy_image(folder / "cut.png", (64, 64)))
    huge_png(folder / "bomb.png", 100_000, 100_000)

    found = discover(dataset_config(subset_config(folder)))
    assert [i.path.name for i in found.images] == ["good.png"]
    reasons = {issue.path.name: issue.reason for issue in found.skipped}
    assert set(reasons) == {"zero.png", "text.jpg", "cut.png", "bomb.png"}
    assert "empty" in reasons["zero.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["cut.png"]
    assert "too large" in reasons["bomb.png"]
    # (path, reason) pairs, as the report and `check` use them.
    path, reason = found.skipped[0]
    assert isinstance(path, Path) and isinstance(reason, str)


def test_sequential_and_threaded_scans_agree(tmp_path, write_image, subset_config, dataset_config):
    folder = tmp_path / "1_x"
    for i in range(12):
        write_image(folder / f"{i:02d}.png", (16 + i, 20))
    config = dataset_config(subset_config(folder))
    assert discover(config, workers=1) == discover(config, workers=4)


def test_empty_dataset_names_the_folders(tmp_path, subset_config, dataset_config):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "broken.png").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        discover(dataset_config(subset_config(a), subset_config(b)))
    message = str(info.value)
    assert str(a) in message and str(b) in message
    assert "broken.png" in message and info.value.hint


def test_missing_folder_is_an_error(tmp_path, subset_config, dataset_config):
    with pytest.raises(DatasetError, match=r"dataset\.subsets\[0\]\.dir.*does not exist"):
        discover(dataset_config(subset_config(tmp_path / "nope")))


def test_only_reg_images_is_an_error(tmp_path, write_image, subset_config, dataset_config):
    folder = write_image(tmp_path / "1_reg" / "a.png", (16, 16)).parent
    with pytest.raises(DatasetError, match="regularization"):
        discover(dataset_config(subset_config(folder, is_reg=True)))


def test_duplicate_subset_is_ignored(tmp_path, write_image, subset_config, dataset_config):
    folder = write_image(tmp_path / "1_x" / "a.png", (16, 16)).parent
    found = discover(dataset_config(subset_config(folder), subset_config(folder, repeats=9)))
    assert len(found.images) == 1 and found.images[0].repeats == 1
    assert any("twice" in w for w in found.warnings)


def test_folder_with_images_and_kohya_children_reads_only_itself(
    tmp_path, write_image, subset_config, dataset_config
):
    write_image(tmp_path / "top" / "a.png", (8, 8))
    write_image(tmp_path / "top" / "3_child" / "b.png", (8, 8))
    found = discover(dataset_config(subset_config(tmp_path / "top")))
    assert [i.path.name for i in found.images] == ["a.png"]
    assert any("sub-folder" in w for w in found.warnings)


def _expected_reg_repeats(num_train: int, folder_repeats: list[int]) -> list[int]:
    """Closed form of sd-scripts' loop, derived independently of balance_reg_repeats."""
    if num_train <= 0 or not folder_repeats:
        return []
    running = 0
    for used, repeats in enumerate(folder_repeats, start=1):
        running += repeats
        if running >= num_train:
            return folder_repeats[:used]
    deficit = num_train - running
    k = len(folder_repeats)
    return [r + deficit // k + (1 if i < deficit % k else 0) for i, r in enumerate(folder_repeats)]


def _reg(repeats: int, i: int) -> ImageRecord:
    return ImageRecord(Path(f"/r/{i}.png"), (8, 8), 1, "", "none", True, repeats)


@given(
    num_train=st.integers(0, 500),
    folder_repeats=st.lists(st.integers(1, 30), max_size=25),
)
def test_reg_balance_matches_sd_scripts_rule(num_train: int, folder_repeats: list[int]) -> None:
    reg = [_reg(r, i) for i, r in enumerate(folder_repeats)]
    balanced = balance_reg_repeats(num_train, reg)
    assert [r.repeats for r in balanced] == _expected_reg_repeats(num_train, folder_repeats)
    assert [r.path for r in balanced] == [r.path for r in reg[: len(balanced)]]
    if balanced and sum(folder_repeats) <= num_train:
        assert sum(r.repeats for r in balanced) == num_train


def test_reg_balance_examples() -> None:
    reg = [_reg(r, i) for i, r in enumerate([1, 1, 1])]
    assert [r.repeats for r in balance_reg_repeats(10, reg)] == [4, 3, 3]
    assert [r.repeats for r in balance_reg_repeats(2, reg)] == [1, 1]
    reg = [_reg(r, i) for i, r in enumerate([5, 5])]
    assert [r.repeats for r in balance_reg_repeats(7, reg)] == [5, 5]
    assert [r.repeats for r in balance_reg_repeats(3, reg)] == [5]


def test_reg_subset_in_discovery(tmp_path, write_image, subset_config, dataset_config):
    train = tmp_path / "train" / "10_sks dog"
    for i in range(3):
        write_image(train / f"{i}.png", (64, 64))
    reg = tmp_path / "reg" / "1_dog"
    for i in range(50):
        write_image(reg / f"{i:02d}.png", (64, 64))
    found = discover(
        dataset_config(
            subset_config(tmp_path / "train"), subset_config(tmp_path / "reg", is_reg=True)
        )
    )
    train_images = [i for i in found.images if not i.is_reg]
    reg_images = [i for i in found.images if i.is_reg]
    assert found.num_train_images == 30 and found.num_reg_images == 50
    assert len(train_images) == 3 and len(reg_images) == 30
    assert all(i.repeats == 1 and i.caption == "dog" for i in reg_images)
    assert len(found.unused_reg_images) == 20
    assert found.unused_reg_images[0].name == "30.png"
    assert any("not used" in w for w in found.warnings)


def test_resolve_keeps_recipe_order_and_config_index(
    tmp_path, write_image, subset_config, dataset_config
):
    write_image(tmp_path / "z" / "2_b" / "x.png", (8, 8))
    write_image(tmp_path / "z" / "1_a" / "x.png", (8, 8))
    write_image(tmp_path / "y" / "x.png", (8, 8))
    resolved = resolve_subsets(
        dataset_config(subset_config(tmp_path / "z"), subset_config(tmp_path / "y", flip_aug=True))
    )
    got = [(s.index, s.config_index, s.dir.name, s.config.flip_aug) for s in resolved.subsets]
    assert got == [(0, 0, "1_a", False), (1, 0, "2_b", False), (2, 1, "y", True)]
    assert replace(resolved.subsets[0], repeats=5).repeats == 5
