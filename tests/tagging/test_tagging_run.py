"""A whole tagging run with the fixture tagger: captions, thresholds, resume, modes, safety."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from loraforge.tagging import (
    TagFolder,
    folder_from_path,
    load_annotator,
    plan_tagging,
    run_tagging,
    tag_frequency,
)

# Expected captions with the default thresholds (0.35 / 0.35), worked out by hand from the
# fixture tagger (conftest.py): blue_hair = sigmoid(10 * (mean B / 255 - 0.5)), red_theme the
# same with R, fixed tags 1girl .95, long_hair .60, ^_^ .50, smile .34, looking_at_viewer .36,
# characters hatsune_miku .80, kagamine_rin .40.
#   blue.png  8x8 blue: B mean 255 -> .993, R mean 0 -> .007
#   wide.png  8x2 blue, padded with 3 white rows above and below: B 255 -> .993, R .75 -> .924
#   clear.png 8x8, 6 columns transparent (-> white), 2 opaque red: R 255 -> .993, B .75 -> .924
CHARS = "hatsune miku, kagamine rin"
EXPECTED = {
    "blue.png": f"blue hair, 1girl, long hair, ^_^, looking at viewer, {CHARS}",
    "wide.png": f"blue hair, 1girl, red theme, long hair, ^_^, looking at viewer, {CHARS}",
    "clear.png": f"red theme, 1girl, blue hair, long hair, ^_^, looking at viewer, {CHARS}",
}


def make_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    Image.fromarray(blue, "RGB").save(folder / "blue.png")
    Image.fromarray(blue[:2], "RGB").save(folder / "wide.png")
    clear = np.zeros((8, 8, 4), np.uint8)  # transparent black: wrong compositing shows up
    clear[:, 6:] = (255, 0, 0, 255)
    Image.fromarray(clear, "RGBA").save(folder / "clear.png")
    return folder


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def run(folder: Path, config, **kwargs):
    selection = folder_from_path(folder)
    annotator = kwargs.pop("annotator", None) or load_annotator(config)
    return run_tagging(
        selection.folders, annotator, config, console=quiet(), show_progress=False, **kwargs
    )


def captions(folder: Path, ext: str = ".txt") -> dict[str, str]:
    return {
        p.with_suffix(".png").name: p.read_text(encoding="utf-8").rstrip("\n")
        for p in sorted(folder.glob(f"*{ext}"))
        if p.is_file()
    }


def test_writes_expected_captions_and_report(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "10_char")
    report = tmp_path / "out" / "tag_frequency.json"
    result = run(folder, tagging_config(batch_size=2), report_path=report)
    assert captions(folder) == EXPECTED
    assert (result.written, result.kept, result.problems) == (3, 0, ())
    expected_report = {"10_char": tag_frequency(EXPECTED.values())}
    assert expected_report["10_char"]["1girl"] == 3 and expected_report["10_char"]["red theme"] == 2
    assert json.loads(report.read_text(encoding="utf-8")) == expected_report
    assert result.frequency == expected_report


def test_thresholds_per_category_follow_the_pixels(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    run(folder, tagging_config(general_threshold=0.93, character_threshold=0.5))
    assert captions(folder) == {
        "blue.png": "blue hair, 1girl, hatsune miku",
        "wide.png": "blue hair, 1girl, hatsune miku",  # red theme .924 < .93
        "clear.png": "red theme, 1girl, hatsune miku",
    }


def test_trigger_undesired_always_first_and_rating(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    config = tagging_config(
        trigger_word="sks",
        undesired_tags=("blue_hair", "kagamine rin", "red theme"),
        always_first_tags=("1girl", "solo"),
        include_rating=True,
        character_tags_first=True,
        replace_tags={"long hair": "very long hair"},
    )
    run(folder, config)
    expected = "sks, 1girl, general, hatsune miku, very long hair, ^_^, looking at viewer"
    assert set(captions(folder).values()) == {expected}


def test_keep_mode_resumes_and_leaves_captions_alone(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    (folder / "blue.txt").write_text("my own caption\n", encoding="utf-8")
    (folder / "wide.txt").write_text("  \n", encoding="utf-8")  # blank counts as missing
    first = run(folder, tagging_config())
    assert (first.written, first.kept) == (2, 1)
    assert captions(folder) == {**EXPECTED, "blue.png": "my own caption"}
    second = run(folder, tagging_config())
    assert (second.written, second.kept) == (0, 3)


def test_interrupted_run_continues_where_it_stopped(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    config = tagging_config(batch_size=1)
    real = load_annotator(config)

    class StopsAfterOne:
        description = "stops"
        calls = 0

        def prepare(self, image):
            return real.prepare(image)

        def annotate(self, prepared):
            StopsAfterOne.calls += 1
            if StopsAfterOne.calls > 1:
                raise KeyboardInterrupt
            return real.annotate(prepared)

    with pytest.raises(KeyboardInterrupt):
        run(folder, config, annotator=StopsAfterOne())
    assert len(captions(folder)) == 1  # the first batch was written before the interruption
    assert not list(folder.glob(".*.tmp"))
    result = run(folder, config)
    assert (result.written, result.kept) == (2, 1)
    assert captions(folder) == EXPECTED


def test_append_and_overwrite(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    (folder / "blue.txt").write_text("solo, Blue_Hair\n", encoding="utf-8")
    config = tagging_config(general_threshold=0.9, character_threshold=0.9)
    run(folder, config, existing="append")
    assert captions(folder)["blue.png"] == "solo, Blue_Hair, 1girl"
    run(folder, config, existing="append")  # appending again adds nothing new
    assert captions(folder)["blue.png"] == "solo, Blue_Hair, 1girl"
    run(folder, tagging_config(existing_captions="overwrite", general_threshold=0.9))
    assert captions(folder)["blue.png"] == f"blue hair, 1girl, {CHARS}"


def test_append_refuses_multi_line_captions(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    (folder / "blue.txt").write_text("line one\nline two\n", encoding="utf-8")
    result = run(folder, tagging_config(), existing="append")
    assert [p.path.name for p in result.problems] == ["blue.png"]
    assert (folder / "blue.txt").read_text(encoding="utf-8") == "line one\nline two\n"


def test_images_are_never_modified(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")

    def state() -> dict[str, tuple[str, int]]:
        return {
            p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in folder.glob("*.png")
        }

    before = state()
    run(folder, tagging_config(), existing="overwrite")
    assert state() == before


def test_failed_write_keeps_the_old_caption(tmp_path: Path, tagging_config, monkeypatch) -> None:
    import loraforge.fileio

    folder = make_images(tmp_path / "imgs")
    (folder / "blue.txt").write_text("precious\n", encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(loraforge.fileio.os, "replace", broken_replace)
    from loraforge.errors import OutputWriteError

    # a failed write is one user error naming the file (issue 17), not a raw OSError
    with pytest.raises(OutputWriteError, match=r"blue\.txt: disk full"):
        run(folder, tagging_config(batch_size=8), existing="overwrite")
    assert (folder / "blue.txt").read_text(encoding="utf-8") == "precious\n"
    assert sorted(p.name for p in folder.iterdir()) == [
        "blue.png",
        "blue.txt",
        "clear.png",
        "wide.png",
    ]


def test_unreadable_images_are_reported_not_fatal(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "empty.jpg").write_bytes(b"")
    result = run(folder, tagging_config())
    assert sorted(p.path.name for p in result.problems) == ["broken.png", "empty.jpg"]
    assert captions(folder) == EXPECTED


def test_unreadable_caption_files(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    (folder / "blue.txt").write_bytes(b"\xff\xfa not utf-8 \x80")
    (folder / "wide.txt").mkdir()
    kept = run(folder, tagging_config())
    assert sorted(p.path.name for p in kept.problems) == ["blue.png", "wide.png"]
    assert (folder / "blue.txt").read_bytes() == b"\xff\xfa not utf-8 \x80"
    overwritten = run(folder, tagging_config(), existing="overwrite")
    assert [p.path.name for p in overwritten.problems] == ["wide.png"]  # a folder stays
    assert captions(folder)["blue.png"] == EXPECTED["blue.png"]


def test_images_sharing_a_caption_file(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.new("RGB", (4, 4)).save(folder / name)
    plan = plan_tagging([TagFolder(folder, "imgs")], ".txt", "keep")
    assert [j.image.name for j in plan.jobs] == ["a.jpg"]
    assert [(p.path.name, p.reason) for p in plan.problems] == [
        ("a.png", "shares its caption file with a.jpg")
    ]


def test_caption_extension_and_separator(tmp_path: Path, tagging_config) -> None:
    folder = make_images(tmp_path / "imgs")
    config = tagging_config(caption_extension=".tags", general_threshold=0.9, character_threshold=1)
    annotator = load_annotator(config)
    selection = folder_from_path(folder, separator="|")
    run_tagging(selection.folders, annotator, config, console=quiet(), show_progress=False)
    assert not list(folder.glob("*.txt"))
    assert captions(folder, ".tags")["blue.png"] == "blue hair| 1girl"
