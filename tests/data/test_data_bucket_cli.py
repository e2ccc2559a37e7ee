"""`loraforge bucket` on a real dataset: kohya folders, a rotated JPEG, broken files, reg images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import DependencyError, OutputExistsError, RecipeError

RECIPE = """\
model:
  base: some/model
dataset:
  resolution: 512
  subsets:
    - dir: dataset
      caption_extension: .txt
    - dir: reg
      is_reg: true
training:
  batch_size: 2
  gradient_accumulation_steps: 2
"""

# Displayed sizes of the good training images (the rotated JPEG is stored 400x300).
FROG = {
    "a_landscape.png": (1000, 750),
    "b_portrait.jpg": (750, 1000),
    "c_photo.webp": (640, 480),
    "d_wide.png": (1920, 1080),
    "e_square.bmp": (512, 512),
    "f_rotated.jpg": (300, 400),
}
CLOSEUP = {"g_tall.png": (333, 777)}
REG = {"r1.png": (512, 512), "r2.png": (768, 512), "r3.png": (512, 768)}


@pytest.fixture
def project(tmp_path, write_image, noisy_image, truncate) -> Path:
    frog = tmp_path / "dataset" / "10_sks frog"
    for name, size in FROG.items():
        if name == "f_rotated.jpg":
            write_image(frog / name, (400, 300), orientation=6)
        else:
            write_image(frog / name, size)
    (frog / "a_landscape.txt").write_text("sks frog, pond", encoding="utf-8")
    closeup = tmp_path / "dataset" / "3_sks frog closeup"
    write_image(closeup / "g_tall.png", CLOSEUP["g_tall.png"])
    (closeup / "h_zero.png").write_bytes(b"")
    truncate(noisy_image(closeup / "i_cut.jpg", (64, 64)))
    (closeup / "j_text.png").write_text("not a picture")
    for name, size in REG.items():
        write_image(tmp_path / "reg" / "1_frog" / name, size)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, ["bucket", *args], catch_exceptions=True)


def expected_from_kohya(kohya, root: Path):
    """Bucket, resized size and centre crop of every image, from the independent reference."""
    resolutions = kohya.resolutions((512, 512), 256, 1024, 64)
    folders = [
        (root / "dataset" / "10_sks frog", FROG, 10),
        (root / "dataset" / "3_sks frog closeup", CLOSEUP, 3),
        (root / "reg" / "1_frog", REG, None),
    ]
    expected = {}
    for folder, images, repeats in folders:
        for name, (w, h) in images.items():
            bucket, resized = kohya.cover(resolutions, w, h)
            left = (resized[0] - bucket[0]) // 2
            top = (resized[1] - bucket[1]) // 2
            crop = [left, top, left + bucket[0], top + bucket[1]]
            expected[str(folder / name)] = (bucket, resized, crop, repeats, (w, h))
    return expected


def test_json_matches_kohya(project, kohya) -> None:
    result = invoke(str(project / "recipe.yaml"), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = expected_from_kohya(kohya, project)

    got = {i["path"]: i for i in report["images"]}
    assert set(got) == set(expected)
    # Reg balance (sd-scripts): 6 x 10 + 1 x 3 = 63 training samples; 3 reg images at 1 repeat
    # fall short, so each pass adds one repeat per reg image: 21 each.
    for path, (bucket, resized, crop, repeats, size) in expected.items():
        image = got[path]
        assert (image["width"], image["height"]) == size
        assert tuple(image["bucket"]) == bucket, path
        assert tuple(image["resized"]) == resized, path
        assert image["crop"] == crop
        assert image["repeats"] == (repeats if repeats is not None else 21)
        assert image["is_reg"] == (repeats is None)
    rotated = got[str(project / "dataset" / "10_sks frog" / "f_rotated.jpg")]
    assert rotated["bucket"] == [448, 576]  # portrait, as displayed

    samples: dict[tuple[int, int], int] = {}
    for bucket, _, _, repeats, _ in expected.values():
        samples[bucket] = samples.get(bucket, 0) + (repeats if repeats is not None else 21)
    buckets = {(b["width"], b["height"]): b for b in report["buckets"]}
    assert {k: b["samples"] for k, b in buckets.items()} == samples
    assert [(b["width"], b["height"]) for b in report["buckets"]] == sorted(samples)

    totals = report["totals"]
    batches = sum(math.ceil(n / 2) for n in samples.values())
    assert totals["images"] == 10 and totals["train_images"] == 7 and totals["reg_images"] == 3
    assert totals["samples_per_epoch"] == 63 + 63
    assert totals["batches_per_epoch"] == batches
    assert totals["steps_per_epoch"] == math.ceil(batches / 2)

    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"h_zero.png", "i_cut.jpg", "j_text.png"}
    assert "empty" in skipped["h_zero.png"]
    assert "truncated" in skipped["i_cut.jpg"]
    assert "not an image" in skipped["j_text.png"]
    assert totals["skipped"] == 3


def test_table_lists_buckets_totals_and_skipped_files(project, kohya) -> None:
    result = invoke(str(project / "recipe.yaml"))
    assert result.exit_code == 0, result.output
    text = result.stdout
    for bucket, *_ in expected_from_kohya(kohya, project).values():
        assert f"{bucket[0]}x{bucket[1]}" in text
    assert "7 training + 3 regularization images" in text
    assert "steps per epoch at batch size 2" in text
    for name in ("h_zero.png", "i_cut.jpg", "j_text.png"):
        assert name in text
    assert "truncated" in text and "empty file" in text
    # Missing captions are reported on stderr, not mixed into the table.
    assert "class tokens" in result.stderr


def test_plot_writes_a_png_and_refuses_to_overwrite(project) -> None:
    pytest.importorskip("matplotlib")
    chart = project / "buckets.png"
    result = invoke(str(project / "recipe.yaml"), "--plot", str(chart))
    assert result.exit_code == 0, result.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = invoke(str(project / "recipe.yaml"), "--plot", str(chart))
    assert isinstance(again.exception, OutputExistsError)
    assert invoke(str(project / "recipe.yaml"), "--plot", str(chart), "--force").exit_code == 0


def test_plot_without_matplotlib_is_a_dependency_error(project, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = invoke(str(project / "recipe.yaml"), "--plot", str(project / "b.png"))
    assert isinstance(result.exception, DependencyError)
    assert "matplotlib" in str(result.exception)


def test_empty_dataset_is_an_error_of_the_recipe(tmp_path) -> None:
    (tmp_path / "dataset").mkdir()
    (tmp_path / "reg").mkdir()
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = invoke(str(tmp_path / "recipe.yaml"))
    # reported as `check` reports it: with its place in the recipe
    assert isinstance(result.exception, RecipeError)
    assert "recipe.yaml:6:5: dataset.subsets: no usable training images" in str(result.exception)
    assert str(tmp_path / "dataset") in str(result.exception)


def test_bucket_command_does_not_import_torch(project) -> None:
    code = (
        "import sys; from loraforge.cli import main\ncode = 0\n"
        "try:\n    main(['bucket', 'recipe.yaml', '--format', 'json'])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, code, file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=project, timeout=120
    )
    assert "HEAVY [] 0" in result.stderr, result.stderr
    assert json.loads(result.stdout)["totals"]["images"] == 10
